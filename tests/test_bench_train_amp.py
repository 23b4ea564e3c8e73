"""benchmarks/bench_train_amp.py's parsing of ``--vary`` (the timing itself is a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_amp.py"
_spec = importlib.util.spec_from_file_location("bench_train_amp", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize(("values", "expected"), [
    ("0,1", ["0", "1"]),
    ("[32,64,128,128],[32,64,128,256]", ["[32,64,128,128]", "[32,64,128,256]"]),
    ("[2,4],8,[1]", ["[2,4]", "8", "[1]"]),
])
def test_vary_splits_at_commas_outside_brackets(values, expected):
    assert bench.split_values(values) == expected
