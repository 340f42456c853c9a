"""aflora's log lines reach the stderr of the moment, even after the one present at setup was closed."""

import io
import logging
import sys

from aflora.logs import configure_logging


def test_log_lines_follow_a_swapped_and_closed_stderr(monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging()
    logger = logging.getLogger("aflora")
    logger.info("round 1 done")
    assert "round 1 done" in first.getvalue()
    first.close()  # what pytest does to a finished test's captured stream
    monkeypatch.setattr(sys, "stderr", second)
    logger.info("round 2 done")
    # (a handler stuck on the closed stream reports a 'Logging error', with the message, on the new one)
    assert "round 2 done" in second.getvalue() and "Logging error" not in second.getvalue()
