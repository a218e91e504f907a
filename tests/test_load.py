"""Serving load and metrics (models/load.py): seeded Poisson arrivals, JSONL
traces, and every metric computed by hand on a three-request trace."""

import json

import numpy as np
import pytest

from models import load


def test_poisson_arrivals_are_reproducible_and_have_the_rate():
    a = load.poisson(4.0, 4000, seed=3)
    assert a == load.poisson(4.0, 4000, seed=3) and a != load.poisson(4.0, 4000, seed=4)
    gaps = np.diff([r.arrival_s for r in a])
    assert a[0].arrival_s == 0.0 and (gaps >= 0).all()
    # exponential gaps of mean 1 / rate: the sample mean within 5 % at n = 4000 (sd 1/sqrt(n) ~ 1.6 %)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert all(128 <= r.prompt_len <= 1024 and 64 <= r.output_len <= 512 for r in a)
    burst = load.poisson(float("inf"), 5, load.Fixed(7), load.Fixed(3))
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in burst] == [(0.0, 7, 3)] * 5


def test_trace_is_read_sorted_and_bad_lines_name_their_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"arrival_s": 0.5, "prompt_len": 10, "output_len": 4},
        {"arrival_s": 0.1, "prompt_len": 20, "output_len": 2}]) + "\n")
    assert [r.arrival_s for r in load.read_trace(path)] == [0.1, 0.5]
    path.write_text('{"arrival_s": 0.1, "prompt_len": 20}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1: expected a JSON object"):
        load.read_trace(path)
    # a shared prompt prefix: its id and length, within the prompt
    path.write_text('{"arrival_s": 0, "prompt_len": 20, "output_len": 2, "prefix_id": 3, "prefix_len": 16}\n')
    assert load.read_trace(path) == [load.LoadRequest(0.0, 20, 2, 3, 16)]
    path.write_text('{"arrival_s": 0, "prompt_len": 20, "output_len": 2, "prefix_id": 3, "prefix_len": 21}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1: .*prefix_len <= prompt_len"):
        load.read_trace(path)


def test_shared_prefixes_are_put_in_front_of_each_prompt():
    reqs = load.poisson(4.0, 200, seed=1)
    shared = load.with_shared_prefix(reqs, 64, groups=3, seed=2)
    assert [r.prompt_len for r in shared] == [r.prompt_len + 64 for r in reqs]
    assert {r.prefix_id for r in shared} == {0, 1, 2} and {r.prefix_len for r in shared} == {64}
    assert shared == load.with_shared_prefix(reqs, 64, groups=3, seed=2)  # seeded


def test_metrics_of_a_three_request_trace_by_hand():
    arrivals = [0.0, 0.1, 0.2]
    tokens = [[0.3, 0.35, 0.40, 0.45],   # TTFT 0.3, TPOT 0.05, ITLs 0.05 x3, E2E 0.45
              [0.7, 0.9],                # TTFT 0.6, TPOT 0.2, ITL 0.2, E2E 0.8
              [0.25]]                    # TTFT 0.05, no TPOT, E2E 0.05
    m = load.metrics(arrivals, tokens, load.SLO(ttft_s=0.5, tpot_s=0.06))
    assert m.requests == 3 and m.output_tokens == 7
    assert m.makespan_s == pytest.approx(0.9)
    assert m.throughput == pytest.approx(7 / 0.9)
    assert m.ttft.mean == pytest.approx((0.3 + 0.6 + 0.05) / 3)
    assert m.ttft.p50 == pytest.approx(0.3)
    # numpy's linear interpolation between the sorted TTFTs 0.05, 0.3, 0.6: p90 at rank 1.8
    assert m.ttft.p90 == pytest.approx(0.3 + 0.8 * 0.3)
    assert m.tpot.mean == pytest.approx((0.05 + 0.2) / 2)
    assert m.itl.p50 == pytest.approx(0.05) and m.itl.p99 == pytest.approx(0.05 + 0.97 * 0.15)
    assert m.e2e.p50 == pytest.approx(0.45)
    # request 0 meets the SLO (0.3 <= 0.5, 0.05 <= 0.06), request 1 misses TTFT, request 2 has no TPOT
    assert m.meeting_slo == 2 and m.goodput == pytest.approx(2 / 0.9)
    assert m.row()["ttft_p50_ms"] == pytest.approx(300)


def test_metrics_refuse_inconsistent_token_times():
    with pytest.raises(ValueError, match="precede the arrival"):
        load.metrics([1.0], [[0.5]])
    with pytest.raises(ValueError, match="2 token lists"):
        load.metrics([0.0], [[1.0], [2.0]])


def test_summary_names_every_metric_in_milliseconds():
    m = load.metrics([0.0], [[0.1, 0.2, 0.4]])
    text = m.summary()
    assert text.startswith("1 requests, 3 output tokens in 0.400 s")
    assert "TTFT mean    100.00" in text and "TPOT mean    150.00" in text and "E2E  mean    400.00" in text
