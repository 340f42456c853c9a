"""What an output folder may receive: a finished run, an unfinished one, a merged model or client files are
never clobbered.

- `aflora run` writes into a new or empty --out. A folder that holds a run (finished: results.json; unfinished:
  a checkpoint) or anything else is refused, unless --overwrite (or --resume, to continue the run in it).
- `aflora run --overwrite` never writes into the old run. The new run goes to a folder beside it,
  `<out>.replacing`, and is swapped in only once it has finished (`finish_replacement`). Why beside, rather than
  moving the old run aside first and writing into --out: until the very end the old run stays whole and usable
  where it was, and at no moment does one folder hold files of both runs (an old results.json next to a new
  checkpoint, old plots next to new TensorBoard events). If the new run stops, --out still holds the old run and
  `<out>.replacing` the new one's checkpoint: `aflora run --resume <out>.replacing` continues it and then swaps.
- `aflora export` and `aflora partition` write beside --out as well and move the result into place at the end
  (`written_aside`): a failure leaves --out as it was. A non-empty --out is refused unless --overwrite.

The swap is two renames (old → `<out>.replaced`, new → `<out>`), then the old folder is deleted. Between the two
renames `<out>` does not exist; a crash exactly there leaves each run whole in its own folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"  # written last by a run: a folder with it holds a finished run
CHECKPOINT_DIR = "checkpoint"  # written after every round: a folder with it (and no results.json) holds an unfinished run
REPLACING_SUFFIX = ".replacing"
REPLACED_SUFFIX = ".replaced"
TARGET_FILE = ".aflora-replaces"  # in a `<out>.replacing` folder: the name of the folder it will replace


def contents(folder: Path) -> list[str]:
    """The names in `folder` (none if it does not exist)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder; choose another --out")
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def prepare_run_folder(out: Path, *, overwrite: bool) -> Path:
    """Where `aflora run` writes: --out itself when it is new or empty; with `overwrite`, a replacement folder
    beside a non-empty one (swapped in by `finish_replacement`). Anything else is refused."""
    held = contents(out)
    if not held:
        return out
    if overwrite:
        return begin_replacement(out)
    if RESULTS_FILE in held:
        raise OutputError(f"{out} already holds a finished run ({RESULTS_FILE}); choose another --out or pass --overwrite")
    if CHECKPOINT_DIR in held:
        raise OutputError(f"{out} holds an unfinished run (its {CHECKPOINT_DIR}/); continue it with `aflora run --resume {out}`, "
                          "replace it with --overwrite, or choose another --out")
    raise OutputError(f"{out} is not empty (it holds {_listing(held)}); choose a new or empty --out, or pass --overwrite to "
                      "replace everything in it")


def begin_replacement(out: Path) -> Path:
    """A fresh folder beside `out` for what will replace it (`finish_replacement` swaps it in)."""
    _refuse_to_replace_a_home(out)
    staging = out.with_name(out.name + REPLACING_SUFFIX)
    if staging.exists():
        log.warning("discarding %s: an earlier replacement of %s that did not finish", staging, out)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / TARGET_FILE).write_text(out.name + "\n")
    return staging


def finish_replacement(folder: Path) -> Path:
    """Swap a finished replacement folder in for the folder it replaces; returns where its contents are now.
    A folder that replaces nothing is returned as it is."""
    marker = folder / TARGET_FILE
    if not marker.is_file():
        return folder
    target = folder.with_name(marker.read_text().strip())
    if target != folder:  # (equal only if a swap stopped between its last rename and removing the marker)
        old = target.with_name(target.name + REPLACED_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.rename(target, old)
        os.rename(folder, target)
        shutil.rmtree(old, ignore_errors=True)
    (target / TARGET_FILE).unlink()
    return target


def abandon_replacement(folder: Path) -> bool:
    """After a failed run into a replacement folder: remove it if it holds nothing to resume; True if kept."""
    if not (folder / TARGET_FILE).is_file():
        return True
    if (folder / CHECKPOINT_DIR).is_dir():
        return True
    shutil.rmtree(folder, ignore_errors=True)
    return False


def unfinished_replacement(out: Path) -> Path | None:
    """The `<out>.replacing` folder of an --overwrite run that stopped after a checkpoint, if there is one."""
    staging = out.with_name(out.name + REPLACING_SUFFIX)
    return staging if (staging / TARGET_FILE).is_file() and (staging / CHECKPOINT_DIR).is_dir() else None


@contextmanager
def run_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """The folder a new run writes into (`prepare_run_folder`); when the block ends without error a replacement is
    swapped in for `out`. On an error `out` keeps the old run, and a replacement is kept only if it holds a
    checkpoint to resume (the warning says how)."""
    write_to = prepare_run_folder(out, overwrite=overwrite)
    try:
        yield write_to
    except BaseException:
        if write_to != out and abandon_replacement(write_to):
            log.warning("%s still holds the previous run; the new one is in %s (continue it with `aflora run --resume %s`, "
                        "which then replaces %s)", out, write_to, write_to, out)
        raise
    finish_replacement(write_to)


@contextmanager
def written_aside(out: Path, *, overwrite: bool, what: str, source: Path | None = None) -> Iterator[Path]:
    """A folder beside `out` to write `what` into, moved to `out` when the block ends without error; on an error it
    is removed and `out` is as it was. A non-empty `out` is refused unless `overwrite`; an `out` overlapping
    `source` (the folder being read) always is."""
    if source is not None:
        a, b = out.resolve(), source.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise OutputError(f"--out {out} overlaps {source}, which is being read; choose an --out outside it")
    held = contents(out)
    if held and not overwrite:
        if RESULTS_FILE in held or CHECKPOINT_DIR in held:
            holds = f"an aflora run ({RESULTS_FILE if RESULTS_FILE in held else CHECKPOINT_DIR + '/'})"
        else:
            holds = _listing(held)
        raise OutputError(f"{out} is not empty: it holds {holds}, which writing {what} there would mix with or overwrite; "
                          f"choose a new or empty --out, or pass --overwrite to replace everything in {out}")
    staging = begin_replacement(out)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_replacement(staging)


def _refuse_to_replace_a_home(out: Path) -> None:
    """A replacement swaps the whole folder: never the file system's root, a home folder or the current one."""
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"--out {out} is the file system's root, a home folder or the current folder (or one above it), which "
                          "aflora does not replace as a whole; give the output a folder of its own, e.g. runs/x")


def _listing(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
