"""Trace (frcnn.model.trace): records stages detached, times stages only when tracing."""

from __future__ import annotations

import torch

from frcnn.model.trace import Trace, maybe_timed


def test_put_detaches_nested_values_and_merges_records():
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    trace = Trace()
    trace.put("stage", a=y, nested={"b": [y, (y, 3)]}, n=5)
    trace.put("stage", c=y)
    rec = trace["stage"]
    assert "stage" in trace and "other" not in trace
    assert set(rec) == {"a", "nested", "n", "c"}
    assert not rec["a"].requires_grad and not rec["c"].requires_grad
    assert not rec["nested"]["b"][0].requires_grad and not rec["nested"]["b"][1][0].requires_grad
    assert rec["nested"]["b"][1][1] == 3 and rec["n"] == 5
    assert torch.equal(rec["a"], torch.full((3,), 2.0))


def test_timed_accumulates():
    trace = Trace()
    for _ in range(2):
        with trace.timed("s"):
            sum(range(1000))
    assert trace.timings["s"] > 0
    with maybe_timed(trace, "t"):
        pass
    assert set(trace.timings) == {"s", "t"}


def test_maybe_timed_without_trace_is_a_no_op():
    ran = []
    with maybe_timed(None, "s"):
        ran.append(1)
    assert ran == [1]
