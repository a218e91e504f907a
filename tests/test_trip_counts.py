"""Loop trip counts before the first call: fixed by the program, given by the
user, or flagged as unmeasured; never one trip silently."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from lowering.passes.trip_counts import _count
from mtia_jax.errors import UnmeasuredLoopWarning

S = jax.ShapeDtypeStruct
# shapes for the modeled time: a 4096^2 bf16 matmul and tanh per trip, tens
# of microseconds, so trips add up to about trips x one trip (a call of one
# trip also pays its first kernel launch, which the loop's trips overlap)
X = S((4096, 4096), jnp.bfloat16)
W = S((4096, 4096), jnp.bfloat16)


def one_trip(x, w):
    return jnp.tanh(x @ w)


def _while(op):
    (loop,) = [o for o in op.module.ops if o.kind == "while"]
    return loop


@pytest.mark.parametrize("kind, start, bound, step, trips", [
    ("lt", 0, 100, 1, 100), ("lt", 0, 10, 3, 4), ("le", 0, 10, 1, 11), ("lt", 5, 3, 1, 0),
    ("gt", 10, 0, -1, 10), ("ge", 10, 0, -2, 6), ("ne", 0, 10, 2, 5), ("ne", 7, 7, 1, 0),
])
def test_count_by_hand(kind, start, bound, step, trips):
    assert _count(kind, start, bound, step) == trips


@pytest.mark.parametrize("kind, start, bound, step", [
    ("lt", 0, 10, -1), ("gt", 10, 0, 1), ("ne", 0, 9, 2), ("ne", 0, 10, -1)])
def test_loops_that_never_end_get_no_count(kind, start, bound, step):
    assert _count(kind, start, bound, step) is None


@pytest.mark.parametrize("cond, body, init, trips", [
    (lambda c: c[0] < 100, lambda i: i + 1, 0, 100),
    (lambda c: 100 > c[0], lambda i: i + 1, 0, 100),     # the bound on the left
    (lambda c: c[0] > 0, lambda i: i - 1, 40, 40),        # counting down
    (lambda c: c[0] != 30, lambda i: i + 3, 0, 10),
    (lambda c: c[0] <= 20, lambda i: 2 + i, 1, 10),     # 1, 3, ..., 19
])
def test_counter_loops_are_charged_every_trip_before_the_first_call(cond, body, init, trips):
    def f(x, w):
        return lax.while_loop(cond, lambda c: (body(c[0]), jnp.tanh(c[1] @ w)), (init, x))[1]

    compiled = mtia_jax.jit(f).lower(X, W).compile()
    assert _while(compiled).attrs["trips"] == trips
    assert f"trips={trips}" in compiled.as_text()
    per_trip = mtia_jax.estimate(one_trip, X, W).time_s
    report = mtia_jax.estimate(f, X, W)
    assert report.time_s >= 0.9 * trips * per_trip
    assert report.cost.assumed_loops == ()
    x, w = (np.random.default_rng(0).standard_normal(s).astype(np.float32) * 0.05
            for s in ((4, 32), (32, 32)))
    np.testing.assert_array_equal(mtia_jax.jit(f)(x, w), jax.jit(f)(x, w))


def test_fori_loop_with_a_bound_fixed_in_the_program():
    # a jnp bound makes fori_loop a while loop (Python ints make it a scan)
    f = lambda x, w: lax.fori_loop(jnp.int32(2), jnp.int32(12), lambda i, c: jnp.tanh(c @ w), x)
    assert _while(mtia_jax.jit(f).lower(X, W)).params["body_nconsts"] >= 1
    report = mtia_jax.estimate(f, X, W)
    per_trip = mtia_jax.estimate(one_trip, X, W).time_s
    assert report.cost.assumed_loops == ()
    assert 9 * per_trip <= report.time_s <= 11 * per_trip


def test_while_in_a_scan_counts_trips_per_execution():
    def f(x, w):
        def step(c, _):
            return lax.while_loop(lambda s: s[0] < 5, lambda s: (s[0] + 1, jnp.tanh(s[1] @ w)),
                                  (0, c))[1], None
        return lax.scan(step, x, None, length=4)[0]

    report = mtia_jax.estimate(f, X, W)
    per_trip = mtia_jax.estimate(one_trip, X, W).time_s
    assert report.cost.assumed_loops == ()
    assert report.time_s >= 0.9 * 20 * per_trip


def dynamic(n, x, w):
    return lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x)


def test_data_dependent_loop_warns_and_is_listed_as_unmeasured():
    n = S((), jnp.int32)
    with pytest.warns(UnmeasuredLoopWarning, match=r"test_trip_counts.py:\d+ \(dynamic\)"):
        report = mtia_jax.estimate(dynamic, n, X, W)
    assert len(report.cost.assumed_loops) == 1
    assert "unmeasured loop" in report.table()
    assert report.to_dict()["unmeasured_loops"] == list(report.cost.assumed_loops)
    compiled = mtia_jax.jit(dynamic).lower(n, X, W).compile()
    with pytest.warns(UnmeasuredLoopWarning):
        assert compiled.cost_analysis()["unmeasured_loops"] == 1


def test_loop_trips_given_as_a_number_or_by_source_line():
    n = S((), jnp.int32)
    per_trip = mtia_jax.estimate(one_trip, X, W).time_s
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmeasuredLoopWarning)
        by_number = mtia_jax.estimate(dynamic, n, X, W, loop_trips=50)
        (loop,) = [op for op in by_number.module.ops if op.kind == "while"]
        line = loop.source.line
        by_line = mtia_jax.estimate(dynamic, n, X, W, loop_trips={f"test_trip_counts.py:{line}": 50})
        by_number_only = mtia_jax.estimate(dynamic, n, X, W, loop_trips={line: 50})
    for report in (by_number, by_line, by_number_only):
        assert report.cost.assumed_loops == ()
        assert 45 * per_trip <= report.time_s <= 55 * per_trip


def test_measured_trips_replace_the_assumed_count():
    small = S((4, 32), jnp.float32), S((32, 32), jnp.float32)
    compiled = mtia_jax.jit(dynamic).lower(S((), jnp.int32), *small).compile()
    with pytest.warns(UnmeasuredLoopWarning):
        before = compiled.cost_analysis()
    x = np.full((32, 32), 0.01, np.float32)
    compiled(7, x[:4], x)
    after = compiled.cost_analysis()
    assert (before["unmeasured_loops"], after["unmeasured_loops"]) == (1, 0)
    body = [k for k in compiled.cost.kernels if "/body/" in k.path]
    assert body and all(k.count == 7 for k in body)
