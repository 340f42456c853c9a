"""95 % intervals for the accuracies aflora reports, and paired differences between methods.

    wilson_interval     one run's accuracy: k correct of n test rows (Wilson score interval)
    t_interval          a mean over seeds: Student's t with n − 1 degrees of freedom
    Stat                a table cell over seeds: mean, sample std and 95 % interval (t, or one run's own)
    paired_bootstrap    entry minus reference on the same test rows (one seed): rows resampled in pairs
    verdict             ahead / level / behind, and only "ahead" or "behind" when the interval excludes 0
    pack_bits           per-row outcomes (correct or not) as a short base64 string for results.json

Why these: Wilson keeps its coverage near 95 % for accuracies near 0 or 1, where the textbook p ± 1.96·se does
not; with several seeds the seed-to-seed spread already holds the test-row noise (each seed samples its own
rows), so a t-interval over the seeds' values (or their paired differences) covers both; with one seed only
the rows vary, and resampling them in pairs removes what both methods get right or wrong together.

Pure Python and numpy, no torch: tests check every interval's coverage on synthetic data with a known answer.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist, fmean, stdev

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same runs give the same table


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes(self, value: float = 0.0) -> bool:
        return value < self.low or value > self.high

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval for a proportion correct/n (Wilson 1927)."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"a proportion needs 0 ≤ correct ≤ n and n > 0, got {correct} of {n}")
    z = normal_quantile(confidence)
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, center - half), min(1.0, center + half))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean ± t · s/√n over independent values (e.g. one per seed); needs at least two."""
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values (seeds), got {len(values)}")
    mean = fmean(values)
    half = t_quantile(confidence, len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


@dataclass
class Stat:
    """One table cell over seeds (aflora compare): mean, sample standard deviation and 95 % interval."""

    mean: float | None
    std: float | None  # sample standard deviation over seeds; None with fewer than 2 values
    low: float | None = None  # 95 % interval: t over seeds with 2 or more, else the run's own (Wilson) where it has one
    high: float | None = None

    @classmethod
    def of(cls, values: list[float | None], run_interval: list[float] | None = None) -> Stat:
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None)
        if len(present) == 1:
            return cls(present[0], None, *(run_interval or (None, None)))
        interval = t_interval(present)
        return cls(interval.estimate, stdev(present), interval.low, interval.high)

    def format(self, spec: str, *, interval: bool = False) -> str:
        if self.mean is None:
            return ""
        if interval:
            return f"{self.mean:{spec}}" + ("" if self.low is None else f" [{self.low:{spec}}, {self.high:{spec}}]")
        return f"{self.mean:{spec}}" if self.std is None else f"{self.mean:{spec}} ± {self.std:{spec}}"


def paired_bootstrap(entry: Sequence[bool], reference: Sequence[bool], *, confidence: float = CONFIDENCE,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Accuracy of `entry` minus that of `reference`, both scored on the same rows in the same order; the
    percentile interval of that difference when the rows are resampled with replacement, in pairs.

    A row only moves the difference when one method is right and the other wrong, so resampling n rows is
    drawing how many of them fall in "only entry right" and "only reference right" (a multinomial): exact,
    and fast enough for 10,000 resamples of any test set."""
    if len(entry) != len(reference) or not entry:
        raise ValueError(f"paired outcomes need the same rows on both sides, got {len(entry)} and {len(reference)} rows")
    n = len(entry)
    only_entry = sum(1 for a, b in zip(entry, reference) if a and not b)
    only_reference = sum(1 for a, b in zip(entry, reference) if b and not a)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [only_entry / n, only_reference / n, 1 - (only_entry + only_reference) / n], size=resamples)
    differences = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return Interval((only_entry - only_reference) / n, float(low), float(high))


def verdict(difference: Interval | None, *, higher_is_better: bool = True) -> str:
    """'ahead' or 'behind' only when the interval of (entry − reference) excludes 0; else 'level'."""
    if difference is None:
        return ""
    if not difference.excludes(0.0):
        return "level"
    return "ahead" if (difference.low > 0) == higher_is_better else "behind"


# ---------------------------------------------------------------------------- quantiles
def normal_quantile(confidence: float) -> float:
    """Two-sided: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t quantile (12.706 for 0.95 and df 1, 4.303 for df 2), by bisection on the exact CDF."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central_probability(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for integer degrees of freedom, by the finite series of Abramowitz & Stegun 26.7.3–4."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


# ---------------------------------------------------------------------------- per-row outcomes in results.json
def pack_bits(bits: Sequence[bool]) -> str:
    """[True, False, True] -> base64 of the packed bits (the row count is stored beside it)."""
    return base64.b64encode(np.packbits(np.asarray(bits, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> list[bool]:
    packed = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if len(packed) != (n + 7) // 8:
        raise ValueError(f"a bitmap of {len(packed)} bytes cannot hold exactly {n} rows")
    return np.unpackbits(packed)[:n].astype(bool).tolist()


def compress_indices(indices: Sequence[int]) -> str:
    """Sorted row indices as ranges: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (all 7,600 AG News rows: '0-7599')."""
    parts: list[str] = []
    for i in indices:
        if parts and i == _last(parts) + 1:
            start = parts[-1].split("-")[0]
            parts[-1] = f"{start}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


def expand_indices(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        start, _, end = part.partition("-")
        out.extend(range(int(start), int(end or start) + 1))
    return out


def _last(parts: list[str]) -> int:
    return int(parts[-1].split("-")[-1])
