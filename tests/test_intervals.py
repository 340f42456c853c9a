"""aflora.intervals: every interval's coverage on synthetic data with a known answer, and that the checks
have teeth (a degenerate interval, or an unpaired comparison, fails them). Seeded: the same numbers every run."""

from __future__ import annotations

import numpy as np
import pytest

from aflora.intervals import (
    Interval,
    compress_indices,
    expand_indices,
    pack_bits,
    paired_bootstrap,
    t_interval,
    t_quantile,
    unpack_bits,
    verdict,
    wilson_interval,
)

NOMINAL_BAND = (0.925, 0.975)  # 95 % ± what a few hundred Monte Carlo trials and a discrete test set allow


def coverage(intervals: list[Interval], truth: float) -> float:
    return sum(iv.low <= truth <= iv.high for iv in intervals) / len(intervals)


def paired_rows(rng, n: int, both: float, only_entry: float, only_reference: float) -> tuple[list[bool], list[bool]]:
    """n test rows scored by two methods: the true accuracy difference is only_entry − only_reference."""
    kind = rng.choice(4, size=n, p=[both, only_entry, only_reference, 1 - both - only_entry - only_reference])
    return ((kind == 0) | (kind == 1)).tolist(), ((kind == 0) | (kind == 2)).tolist()


# ---------------------------------------------------------------------------- one run: Wilson
@pytest.mark.parametrize("n, p", [(200, 0.3), (200, 0.5), (50, 0.75), (1000, 0.9)])
def test_wilson_covers_the_true_accuracy_95_percent_of_the_time(n, p):
    draws = np.random.default_rng(7).binomial(n, p, size=4000)
    assert NOMINAL_BAND[0] <= coverage([wilson_interval(int(k), n) for k in draws], p) <= NOMINAL_BAND[1]


def test_a_zero_width_interval_fails_the_coverage_check():
    n, p = 200, 0.5
    draws = np.random.default_rng(7).binomial(n, p, size=4000)
    assert coverage([Interval(k / n, k / n, k / n) for k in draws], p) < 0.1


def test_wilson_stays_inside_0_and_1_and_refuses_nonsense():
    assert wilson_interval(0, 20).low == 0.0 and wilson_interval(20, 20).high == 1.0
    assert 0 < wilson_interval(0, 20).high < 0.2
    iv = wilson_interval(150, 200)
    assert iv.estimate == 0.75 and iv.low == pytest.approx(0.6857, abs=1e-4) and iv.high == pytest.approx(0.8049, abs=1e-4)
    with pytest.raises(ValueError, match="0 ≤ correct ≤ n"):
        wilson_interval(3, 0)


# ---------------------------------------------------------------------------- seeds: t
@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (1000, 1.962)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=5e-4)


def seed_differences(rng, seeds: int, mean: float, seed_spread: float, rows: int = 300) -> list[list[tuple[list[bool], list[bool]]]]:
    """Per seed, both methods' outcomes on that seed's rows; the seed moves the true difference by N(0, seed_spread)."""
    out = []
    for _ in range(seeds):
        delta = mean + rng.normal(0, seed_spread)
        out.append(paired_rows(rng, rows, 0.6, 0.08 + delta / 2, 0.08 - delta / 2))
    return out


def test_t_interval_over_seeds_covers_the_mean_difference_and_pooling_rows_does_not():
    """Three seeds whose true differences vary: the t-interval over the per-seed differences covers the mean
    difference at the nominal rate; bootstrapping the pooled rows (ignoring that seeds vary) covers far less."""
    rng = np.random.default_rng(11)
    t_intervals, pooled = [], []
    for _ in range(400):
        runs = seed_differences(rng, 3, mean=0.02, seed_spread=0.03)
        t_intervals.append(t_interval([(sum(a) - sum(b)) / len(a) for a, b in runs]))
        pooled.append(paired_bootstrap([x for a, _ in runs for x in a], [y for _, b in runs for y in b], resamples=1000))
    assert NOMINAL_BAND[0] <= coverage(t_intervals, 0.02) <= NOMINAL_BAND[1]
    assert coverage(pooled, 0.02) < 0.8


def test_t_interval_needs_two_values():
    assert t_interval([0.7, 0.8]).estimate == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval([0.7])


# ---------------------------------------------------------------------------- one seed: paired bootstrap over rows
@pytest.mark.parametrize("n, both, only_entry, only_reference", [(300, 0.6, 0.08, 0.04), (1000, 0.5, 0.10, 0.07), (200, 0.7, 0.05, 0.05)])
def test_paired_bootstrap_covers_the_true_difference(n, both, only_entry, only_reference):
    rng = np.random.default_rng(3)
    intervals = [paired_bootstrap(*paired_rows(rng, n, both, only_entry, only_reference), resamples=2000) for _ in range(1000)]
    assert NOMINAL_BAND[0] <= coverage(intervals, only_entry - only_reference) <= NOMINAL_BAND[1]


def test_an_unpaired_comparison_fails_the_coverage_check():
    """Resampling each method's rows on its own forgets that both score the same rows: when they mostly agree,
    its interval is several times too wide and covers nearly always, far above 95 %."""
    rng = np.random.default_rng(3)

    def unpaired(entry: list[bool], reference: list[bool]) -> Interval:
        draws = np.random.default_rng(0)
        a = draws.binomial(len(entry), sum(entry) / len(entry), 2000) / len(entry)
        b = draws.binomial(len(reference), sum(reference) / len(reference), 2000) / len(reference)
        low, high = np.quantile(a - b, [0.025, 0.975])
        return Interval((sum(entry) - sum(reference)) / len(entry), float(low), float(high))

    samples = [paired_rows(rng, 300, 0.7, 0.04, 0.02) for _ in range(300)]
    paired = [paired_bootstrap(a, b, resamples=2000) for a, b in samples]
    loose = [unpaired(a, b) for a, b in samples]
    assert NOMINAL_BAND[0] <= coverage(paired, 0.02) <= NOMINAL_BAND[1]
    assert coverage(loose, 0.02) > 0.99
    assert np.mean([iv.high - iv.low for iv in loose]) > 2.5 * np.mean([iv.high - iv.low for iv in paired])


def test_identical_methods_are_level():
    rng = np.random.default_rng(5)
    a, _ = paired_rows(rng, 400, 0.6, 0.1, 0.1)
    same = paired_bootstrap(a, a)
    assert (same.estimate, same.low, same.high, verdict(same)) == (0.0, 0.0, 0.0, "level")
    # two methods equally good, making different mistakes: "level" about 95 % of the time
    verdicts = [verdict(paired_bootstrap(*paired_rows(rng, 400, 0.6, 0.1, 0.1), resamples=2000)) for _ in range(300)]
    assert verdicts.count("level") / len(verdicts) >= NOMINAL_BAND[0]


def test_paired_bootstrap_is_reproducible_and_refuses_unpaired_rows():
    a, b = paired_rows(np.random.default_rng(1), 200, 0.6, 0.1, 0.05)
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="same rows on both sides"):
        paired_bootstrap(a, b[:-1])


def test_verdict_says_ahead_or_behind_only_when_the_interval_excludes_zero():
    assert verdict(Interval(0.03, 0.01, 0.05)) == "ahead"
    assert verdict(Interval(-0.03, -0.05, -0.01)) == "behind"
    assert verdict(Interval(0.03, -0.001, 0.06)) == "level"
    assert verdict(Interval(-0.2, -0.3, -0.1), higher_is_better=False) == "ahead"  # a lower loss
    assert verdict(None) == ""


# ---------------------------------------------------------------------------- what results.json stores
def test_per_row_outcomes_and_row_indices_round_trip_compactly():
    bits = np.random.default_rng(0).random(2001) < 0.7
    text = pack_bits(bits.tolist())
    assert unpack_bits(text, 2001) == bits.tolist() and len(text) <= 4 * (2001 // 8 + 1) // 3 + 4
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_bits(text, 3000)
    indices = [0, 1, 2, 5, 7, 8, 20]
    assert compress_indices(indices) == "0-2,5,7-8,20" and expand_indices("0-2,5,7-8,20") == indices
    assert compress_indices(range(7600)) == "0-7599" and expand_indices("") == []
