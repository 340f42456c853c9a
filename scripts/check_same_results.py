"""Did a refactoring change what a run computes? Run the same tiny experiments before and after, then diff.

    # 1. record the reference in a worktree of the old commit (the script may be copied there untracked)
    git worktree add /tmp/before HEAD
    cp scripts/check_same_results.py /tmp/before/scripts/
    (cd /tmp/before && /work/main/.venv/bin/python scripts/check_same_results.py produce /tmp/results-before)
    # 2. the same on the changed tree
    .venv/bin/python scripts/check_same_results.py produce /tmp/results-after
    # 3. every results.json under one folder against its namesake under the other
    .venv/bin/python scripts/check_same_results.py /tmp/results-before /tmp/results-after

`produce` runs, with the code of the repository the script sits in (its src/ first on the path):
`aflora compare` of every method in aflora.methods.METHODS (or --methods) on tests/helpers' tiny config
(tiny-llama, 3 clients with ranks [8, 4, 2], 2 rounds, fp32, seed 0), then `aflora run` of the same config,
plus three runs that take the other paths of a round: personalized evaluation (FedSA-LoRA with local test
rows), SecAgg+, and a client failing in round 2. The tiny dataset is written to one fixed folder
(--data), so both sides' configs name the same files.

The diff compares every field except timings (a key ending in `_seconds`, which includes wall time);
floats equal within 1e-6 relative (--rel). Two things vary from run to run with the same code, and are
compared accordingly:
- a failure `reason` that holds a Ray traceback (process ids, addresses, file paths): its last line only;
- the SecAgg+ run: Flower quantizes the masked vectors with unseeded stochastic rounding
  (flwr/common/secure_aggregation/quantization.py, np.random), so its floats agree within --rel-secagg
  (1e-2 relative; two runs of the same commit differ by ~5e-4).
It prints one line per difference and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/tmp/aflora-same-results-data")

EXTRA_RUNS = {  # folder -> overrides of the tiny config
    "run": [],
    "run-personalized": ['method="fedsa_lora"', "data.local_test_fraction=0.25"],
    "run-secagg": ["secagg.enabled=true"],
    "run-fault": ["federation.min_replies=2", "engine.fail_clients=[1]", "engine.fail_from_round=2"],
}


# ---------------------------------------------------------------------------- producing the results
def produce(out: Path, data: Path, methods: list[str] | None) -> None:
    sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]  # this repository's code, not the installed one
    from aflora.methods import METHODS

    from helpers import write_tiny_config_toml

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    aflora = [sys.executable, "-m", "aflora"]
    config = write_tiny_config_toml(data)
    names = methods or sorted(METHODS)
    print(f"code: {REPO / 'src'}; methods: {','.join(names)}", flush=True)
    subprocess.run([*aflora, "compare", "--config", str(config), "--methods", ",".join(names), "--seeds", "0",
                    "--out", str(out / "compare"), "--overwrite"], check=True, env=env)
    for folder, overrides in EXTRA_RUNS.items():
        sets = [arg for override in overrides for arg in ("--set", override)]
        subprocess.run([*aflora, "run", "--config", str(config), *sets, "--out", str(out / folder), "--overwrite"],
                       check=True, env=env)


# ---------------------------------------------------------------------------- comparing them
def is_timing(key: str) -> bool:
    return key.endswith("_seconds") or key.endswith("_seconds_so_far")


def last_line(reason: str) -> str:
    lines = reason.strip().splitlines()
    return lines[-1] if lines else reason


def differences(a, b, path: str, rel: float) -> list[str]:
    if path.endswith(".reason") and isinstance(a, str) and isinstance(b, str):
        a, b = last_line(a), last_line(b)
    if isinstance(a, dict) and isinstance(b, dict):
        only = sorted(set(a) ^ set(b))
        found = [f"{path}: key {k!r} in only one" for k in only]
        return found + [d for k in a if k in b and not is_timing(k) for d in differences(a[k], b[k], f"{path}.{k}", rel)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", rel)]
    if isinstance(a, float) and isinstance(b, float):
        same = a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
        return [] if same else [f"{path}: {a!r} != {b!r}"]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def compare_folders(before: Path, after: Path, rel: float, rel_secagg: float) -> int:
    files_before = {p.relative_to(before) for p in before.rglob("results.json")}
    files_after = {p.relative_to(after) for p in after.rglob("results.json")}
    found = [f"{name}: only in {before}" for name in sorted(files_before - files_after)]
    found += [f"{name}: only in {after}" for name in sorted(files_after - files_before)]
    for name in sorted(files_before & files_after):
        a, b = (json.loads((folder / name).read_text()) for folder in (before, after))
        diffs = differences(a, b, "", rel_secagg if a["config"]["secagg"]["enabled"] else rel)
        found += [f"{name}{d}" for d in diffs]
        print(f"{name}: {'same' if not diffs else f'{len(diffs)} difference(s)'}")
    for line in found:
        print(line)
    compared = len(files_before & files_after)
    print(f"{compared} results.json compared, {len(found)} difference(s) (timings ignored, floats within {rel:g} relative, "
          f"{rel_secagg:g} under SecAgg+)")
    return 1 if found else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "produce":
        parser = argparse.ArgumentParser(prog="check_same_results.py produce")
        parser.add_argument("out", type=Path)
        parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the tiny dataset and config go")
        parser.add_argument("--methods", help="comma-separated; default: every method in aflora.methods.METHODS")
        args = parser.parse_args(sys.argv[2:])
        produce(args.out.resolve(), args.data.resolve(), args.methods.split(",") if args.methods else None)
        return 0
    parser = argparse.ArgumentParser(description="List the differences between the results.json files of two folders")
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rel", type=float, default=1e-6, help="relative tolerance for floats")
    parser.add_argument("--rel-secagg", type=float, default=1e-2, help="... in runs with SecAgg+ (stochastic rounding)")
    args = parser.parse_args()
    return compare_folders(args.before, args.after, args.rel, args.rel_secagg)


if __name__ == "__main__":
    sys.exit(main())
