"""benchmarks/serving_sweep.py with a JSONL trace as its load (--trace): the
requests, lengths and timing come from the trace, --rates scales its arrivals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serving_sweep  # noqa: E402
from models import load  # noqa: E402

TRACE = [  # arrival_s, prompt_len, output_len; out of order on purpose (read_trace sorts)
    (0.0, 12, 5), (0.5, 30, 8), (0.25, 7, 3), (1.0, 20, 12), (2.0, 16, 4)]
TINY = ["--preset", "tiny", "--chip", "mtia450", "--mesh", "1x1", "--dtype", "bf16", "--no-plot", "--no-progress"]


@pytest.fixture
def trace(tmp_path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": a, "prompt_len": p, "output_len": o}) + "\n"
                            for a, p, o in TRACE))
    return path


def _rows(out: str) -> list[list[str]]:
    """The table's data rows (the lines after the ``req/s`` head, up to the KV pool line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["req/s", "reqs"]) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("KV pool"):
            break
        rows.append(line.split())
    return rows


def test_a_trace_without_rates_runs_once_at_its_own_timing(trace, capsys):
    assert serving_sweep.main([*TINY, "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert f"load: 5 requests from the trace {trace}" in out and "one run at its own timing" in out
    assert "Poisson" not in out
    rows = _rows(out)
    assert len(rows) == 1
    rate, served = float(rows[0][0]), int(rows[0][1])
    assert rate == pytest.approx(len(TRACE) / 2.0)  # requests / (last - first arrival)
    assert served == len(TRACE)


def test_a_trace_with_rates_runs_once_per_rate_with_its_requests(trace, capsys):
    assert serving_sweep.main([*TINY, "--trace", str(trace), "--rates", "1,50"]) == 0
    out = capsys.readouterr().out
    assert "scaled to each rate" in out
    rows = _rows(out)
    assert [float(r[0]) for r in rows] == [1.0, 50.0]
    assert [int(r[1]) for r in rows] == [len(TRACE)] * 2


def test_scaling_keeps_order_lengths_and_gaps():
    # sorted by arrival, as models.load.read_trace returns a trace
    trace = sorted((load.LoadRequest(a + 3.0, p, o) for a, p, o in TRACE), key=lambda r: r.arrival_s)
    assert serving_sweep.trace_rate(trace) == pytest.approx(2.5)
    fast = serving_sweep.scaled(trace, 10.0)
    assert [r.arrival_s for r in fast] == pytest.approx([0.0, 0.0625, 0.125, 0.25, 0.5])
    assert [(r.prompt_len, r.output_len) for r in fast] == [(r.prompt_len, r.output_len) for r in trace]
    assert serving_sweep.trace_rate(fast) == pytest.approx(10.0)
    burst = [load.LoadRequest(1.0, 4, 4)] * 3
    assert serving_sweep.trace_rate(burst) == float("inf")
    with pytest.raises(ValueError, match="all arrive at once"):
        serving_sweep.scaled(burst, 1.0)


def test_a_trace_excludes_the_generator_options(trace, capsys):
    with pytest.raises(SystemExit):
        serving_sweep.main([*TINY, "--trace", str(trace), "--requests", "5"])
    assert "--requests: for the generated load only" in capsys.readouterr().err


def test_without_a_trace_the_load_is_poisson(capsys):
    args = [*TINY, "--rates", "2", "--requests", "4", "--prompt", "8,32", "--output", "4,16"]
    assert serving_sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "load: Poisson arrivals generated per rate (seed 0)" in out
    assert [(float(r[0]), int(r[1])) for r in _rows(out)] == [(2.0, 4)]


def test_a_shared_prefix_is_served_by_the_prefix_cache(trace, capsys):
    # every prompt gains the same 32-token system prompt: after the first request, its two full
    # blocks of 16 come from the cache (all but the first request's, while the pool keeps them)
    assert serving_sweep.main([*TINY, "--trace", str(trace), "--shared-prefix", "32"]) == 0
    out = capsys.readouterr().out
    assert "each prompt starts with one of 1 shared prefixes of 32 tokens" in out
    cached = _rows(out)[0][-1]
    prompts = sum(p + 32 for _, p, _ in TRACE)
    assert cached == f"{(len(TRACE) - 1) * 32 / prompts:.0%}"
    assert serving_sweep.main([*TINY, "--trace", str(trace), "--shared-prefix", "32",
                               "--no-prefix-caching"]) == 0
    assert _rows(capsys.readouterr().out)[0][-1] == "0%"
    with pytest.raises(SystemExit):
        serving_sweep.main([*TINY, "--trace", str(trace), "--shared-prefix", "x"])
