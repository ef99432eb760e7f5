"""How a stay ends (``leaving.py``): stops run in the reverse order of the starts, each timed, none skipped."""

from __future__ import annotations

import logging
from contextlib import ExitStack

import pytest

from p2ptrain.leaving import Leaving


def test_parts_stop_in_reverse_start_order_and_a_failing_stop_skips_none(caplog):
    ending, stopped = Leaving(), []

    def fail() -> None:
        stopped.append("averagers")
        raise RuntimeError("daemon gone")

    with caplog.at_level(logging.INFO, logger="p2ptrain.leaving"), pytest.raises(KeyError):
        with ExitStack() as parts:
            try:
                parts.callback(ending.summarize)
                for name in ("dht", "checkpoint"):
                    parts.callback(ending.timed(name, stopped.append, name))
                parts.callback(ending.timed("averagers", fail))
                parts.callback(ending.timed("watch", stopped.append, "watch"))
                raise KeyError("a part failed to start")  # the stay fails: what was started still stops
            finally:
                ending.begin(rejoining=False)
    assert stopped == ["watch", "averagers", "checkpoint", "dht"]
    assert "Leaving: averagers failed: RuntimeError('daemon gone')" in caplog.text
    summary = caplog.records[-1].getMessage()
    assert summary.startswith("Stopped in ") and "watch 0.0 s, averagers 0.0 s, checkpoint 0.0 s, dht 0.0 s" in summary
