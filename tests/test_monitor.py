import json
import math
import warnings

import pytest

from ssl_distill.engine.monitor import CollapseMonitor, JsonlLogger


def test_uniform_collapse_warns_after_the_window_only():
    k = 1000
    mon = CollapseMonitor(k, window=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.update(0.99 * math.log(k), 0.01, step=10, iters=10) is None
        assert mon.update(0.99 * math.log(k), 0.01, step=20, iters=10) is None
    with pytest.warns(RuntimeWarning, match="near uniform"):
        mon.update(0.99 * math.log(k), 0.01, step=30, iters=10)


def test_healthy_and_interrupted_windows_do_not_warn():
    k = 1000
    mon = CollapseMonitor(k, window=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.update(0.99 * math.log(k), 0.0, step=10, iters=10)
        mon.update(0.5 * math.log(k), 0.2, step=20, iters=10)  # healthy: resets the count
        mon.update(0.99 * math.log(k), 0.0, step=30, iters=10)
        # sharp but spread over prototypes is what DINO wants: no warning
        for s in range(5):
            mon.update(0.001, 0.1, step=40 + s, iters=10)


def test_one_prototype_collapse_warns():
    k = 1000
    mon = CollapseMonitor(k, window=10)
    with pytest.warns(RuntimeWarning, match="one dimension"):
        mon.update(0.0, math.log(k), step=10, iters=10)


def test_jsonl_logger_appends(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5})
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
