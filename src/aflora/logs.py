"""Logging that tells a person what is happening (round, client, loss) without flooding."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _DropDeprecatedSimulationNotice(logging.Filter):
    """`aflora run` deliberately uses Flower's in-process simulation API; its deprecation notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage() and "This is a deprecated feature" not in record.getMessage()


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not the one at setup: a test runner or a
    notebook swaps and closes it, and a handler bound to a closed stream only prints 'Logging error'."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _ignored) -> None:
        pass


def quiet_flower(verbose: bool) -> None:
    """Call after Flower is imported (it installs its own handler and level at import)."""
    flwr_logger = logging.getLogger("flwr")
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    for handler in flwr_logger.handlers:
        handler.addFilter(_DropDeprecatedSimulationNotice())


def configure_logging(verbose: bool = False) -> None:
    """aflora's own INFO lines on stderr; the libraries' chatter only when verbose."""
    level = logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("aflora")
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars (GGUF conversion, weight loading)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="peft")
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
