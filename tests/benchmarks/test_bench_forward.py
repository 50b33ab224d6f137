"""Smoke run of ``benchmarks.bench_forward`` (tiny GPT-2, one repeat): every part of the forward runs
and is reported. Timings are not checked."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
bench = pytest.importorskip("benchmarks.bench_forward")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_forward_reports_every_part(capsys):
    times = bench.measure("hf-gpt2", "tiny", repeats=1)
    assert set(times) == set(bench.PARTS) and all(len(v) == 1 and v[0] > 0 for v in times.values())
    bench.main(["--workloads", "hf-gpt2", "--size", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "hf-gpt2" in out and all(p in out for p in bench.PARTS)
