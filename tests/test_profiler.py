"""Profiling: Perfetto traces of compiled calls on the modeled timeline, and
the per-kernel profile table."""

import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import mtia_jax
from mtia_jax import profiler

BASENAME = os.path.basename(__file__)


def _line_of(fn, offset=1):
    return fn.__code__.co_firstlineno + offset


def mlp(x, w1, w2):
    h = jax.nn.relu(x @ w1)
    return jnp.tanh(h @ w2)


ARGS = (jnp.ones((32, 64)), jnp.ones((64, 128)), jnp.ones((128, 16)))


def countdown(n, x):
    return lax.while_loop(lambda s: s[0] > 0, lambda s: (s[0] - 1, jnp.sin(s[1])), (n, x))[1] * 2.0


def _load(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _kernel_events(data):
    return [e for e in data["traceEvents"] if e["ph"] == "X"]


def _check_schema(data):
    assert data["displayTimeUnit"] == "ns"
    for event in data["traceEvents"]:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in event, (key, event)
        assert event["ph"] in ("X", "M")
        if event["ph"] == "X":
            assert event["dur"] >= 0
            assert {"flops", "hbm_bytes", "bound", "count", "path"} <= set(event["args"])


def _per_call(events):
    calls = {}
    for e in events:
        calls.setdefault(e["args"]["call"], []).append(e)
    return [calls[k] for k in sorted(calls)]


def test_trace_writes_modeled_kernels_of_every_call(tmp_path):
    f = mtia_jax.jit(mlp, chip="mtia450")
    compiled = f.lower(*ARGS).compile()
    cost = compiled.cost_analysis()
    dev = mtia_jax.devices("mtia450")[0]
    path = tmp_path / "sub" / "trace.json"
    with profiler.trace(path) as t:
        clock0 = dev.stats.busy_s
        for _ in range(3):
            f(*ARGS)
        assert t.num_calls == 3
    data = _load(path)
    _check_schema(data)
    meta = [e for e in data["traceEvents"] if e["ph"] == "M"]
    assert {"name": "mtia450:0 (modeled)"} in [e["args"] for e in meta if e["name"] == "process_name"]
    threads = {e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads == {"compute", "dma", "network", "host"}

    calls = _per_call(_kernel_events(data))
    assert len(calls) == 3
    for events in calls:
        assert sum(e["dur"] for e in events) * 1e-6 == pytest.approx(cost["time_s"], rel=1e-9)
        assert len(events) == cost["kernels"]
        assert {e["args"]["program"] for e in events} == {"mlp"}
    # calls back to back on the device's modeled clock
    assert calls[0][0]["ts"] == pytest.approx(clock0 * 1e6)
    for before, after in zip(calls, calls[1:]):
        end = max(e["ts"] + e["dur"] for e in before)
        assert min(e["ts"] for e in after) == pytest.approx(end)
    # kernels of one call do not overlap (the model runs them back to back)
    events = sorted(calls[0], key=lambda e: e["ts"])
    for a, b in zip(events, events[1:]):
        assert b["ts"] == pytest.approx(a["ts"] + a["dur"])
    # names point at the user's lines; args equal the cost model's kernels
    kernels = {k.path: k for k in compiled.cost.kernels}
    for e in calls[0]:
        k = kernels[e["args"]["path"]]
        assert e["name"].startswith(f"{k.kind} @ {BASENAME}:")
        assert e["args"]["flops"] == k.flops and e["args"]["hbm_bytes"] == k.hbm_bytes
        assert e["args"]["bound"] == k.bound and e["args"]["count"] == k.count
    lines = {int(re.search(r":(\d+)$", e["name"]).group(1)) for e in calls[0]}
    assert lines <= {_line_of(mlp), _line_of(mlp, 2)} and lines


def test_trace_has_one_process_per_device(tmp_path):
    g = lambda x: jnp.exp(x) * 2.0
    x = jnp.ones((256, 256))
    with profiler.trace(tmp_path / "two.json") as t:
        mtia_jax.jit(g, chip="mtia450")(x)
        mtia_jax.jit(g, chip="mtia400")(x)
    data = _load(t.path)
    _check_schema(data)
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names.values()) == ["mtia400:0 (modeled)", "mtia450:0 (modeled)"]
    pids = {e["pid"] for e in _kernel_events(data)}
    assert pids == set(names)


def test_nested_traces_each_hold_their_own_calls(tmp_path):
    f = mtia_jax.jit(mlp, chip="mtia450")
    with profiler.trace(tmp_path / "outer.json") as outer:
        f(*ARGS)
        with profiler.trace(tmp_path / "inner.json") as inner:
            f(*ARGS)
        f(*ARGS)
    outer_events, inner_events = _kernel_events(_load(outer.path)), _kernel_events(_load(inner.path))
    assert len(_per_call(outer_events)) == 3 and len(_per_call(inner_events)) == 1
    # the inner call sits at the same place on the device's clock in both
    middle = _per_call(outer_events)[1]
    assert [e["name"] for e in middle] == [e["name"] for e in inner_events]
    assert [e["ts"] for e in middle] == pytest.approx([e["ts"] for e in inner_events])
    assert [e["dur"] for e in middle] == pytest.approx([e["dur"] for e in inner_events])


def test_start_and_stop_trace(tmp_path):
    f = mtia_jax.jit(mlp, chip="mtia450")
    profiler.start_trace(tmp_path / "session.json.gz")
    try:
        with pytest.raises(RuntimeError, match="already started"):
            profiler.start_trace(tmp_path / "other.json")
        f(*ARGS)
    finally:
        written = profiler.stop_trace()
    assert written == tmp_path / "session.json.gz"
    data = _load(written)
    _check_schema(data)
    assert len(_per_call(_kernel_events(data))) == 1
    with pytest.raises(RuntimeError, match="no trace started"):
        profiler.stop_trace()
    f(*ARGS)  # not recording any more
    assert len(_per_call(_kernel_events(_load(written)))) == 1


def test_trace_is_written_when_the_block_raises_and_into_a_directory(tmp_path):
    f = mtia_jax.jit(mlp, chip="mtia450")
    with pytest.raises(ZeroDivisionError):
        with profiler.trace(tmp_path) as t:
            f(*ARGS)
            1 / 0
    assert t.path == tmp_path / "mtia_jax.trace.json"
    assert len(_per_call(_kernel_events(_load(t.path)))) == 1


def test_trace_of_a_while_loop_uses_each_calls_trip_count(tmp_path):
    f = mtia_jax.jit(countdown, chip="mtia450")
    x = jnp.ones(1024)
    expected = []
    with profiler.trace(tmp_path / "loop.json") as t:
        for n in (3, 10, 0):
            f(n, x)
            (compiled,) = f._cache.values()
            expected.append(compiled.cost_analysis()["time_s"])  # for the last call's trips
    calls = _per_call(_kernel_events(_load(t.path)))
    totals = [sum(e["dur"] for e in events) * 1e-6 for events in calls]
    assert totals == pytest.approx(expected, rel=1e-9)
    assert totals[1] > totals[0] > totals[2]


# ----------------------------------------------------------------- profile


def test_profile_rows_are_the_kernels_sorted_by_time():
    compiled = mtia_jax.jit(mlp, chip="mtia450").lower(*ARGS).compile()
    cost = compiled.cost
    prof = compiled.profile()
    assert len(prof.rows) == len(cost.kernels) == len(prof)
    times = [r.time_s for r in prof.rows]
    assert times == sorted(times, reverse=True)
    assert sum(times) == pytest.approx(compiled.cost_analysis()["time_s"], rel=1e-12)
    assert sum(r.share for r in prof.rows) == pytest.approx(1.0)
    assert prof.flops == compiled.cost_analysis()["flops"]
    by_path = {k.path: k for k in cost.kernels}
    for r in prof.rows:
        k = by_path[r.path]
        assert (r.kind, r.count, r.flops, r.hbm_bytes, r.bound) == (k.kind, k.count, k.flops,
                                                                     k.hbm_bytes, k.bound)
        assert r.source == k.source and f"{BASENAME}:" in r.name


def test_profile_prints_an_aligned_table_with_a_total_row():
    compiled = mtia_jax.jit(mlp, chip="mtia400").lower(*ARGS).compile()
    prof = compiled.profile()
    text = str(prof)
    lines = text.splitlines()
    assert lines[0].startswith("Times modeled on mtia400") and "not a measurement" in lines[0]
    header, rows, total = lines[1], lines[3:-2], lines[-1]
    assert len(rows) == len(prof.rows)
    assert total.startswith("total")
    assert f"{prof.time_s * 1e6:.3f}" in total and "100.0%" in total
    # the right-aligned "modeled us" column ends at the same place on every line
    end = header.index("modeled us") + len("modeled us")
    for line, row in zip(rows, prof.rows):
        assert line[:end].endswith(f"{row.time_s * 1e6:.3f}")
    assert compiled.kernel_table() == text
    assert "modeled" in repr(prof)


@pytest.mark.filterwarnings("ignore::mtia_jax.errors.MTIAHostFallbackWarning")
def test_profile_labels_host_kernels():
    compiled = mtia_jax.jit(lambda z: jnp.fft.fft(z) * 2, chip="mtia450").lower(
        jnp.ones(64, jnp.complex64)).compile()
    bounds = {r.kind: r.bound for r in compiled.profile().rows}
    assert bounds["host_fallback"] == "host"
