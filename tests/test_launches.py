"""``runtime.cost_model.LAUNCH_MODELS``: graph mode (each launch overlaps the
kernel before it; only what a short kernel leaves exposed is paid, the
first kernel pays it whole, loop bodies wrap around) and eager mode (every
launch paid), by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from lowering.from_jaxpr import import_closed_jaxpr
from lowering.pipeline import PassContext, run_passes
from mtia_jax import chips
from runtime.cost_model import LAUNCH_MODELS, program_cost

S = jax.ShapeDtypeStruct
F32 = jnp.float32
CHIP = chips.get("mtia450")
LAUNCH = CHIP.kernel_launch_s
BW = CHIP.hbm_bandwidth * CHIP.hbm_efficiency
SMALL = S((8,), F32)
D_SMALL = 2 * 8 * 4 / BW    # a kernel reading and writing f32[8]: memory-bound
BIG_N = 1 << 22
D_BIG = 2 * BIG_N * 4 / BW  # 32 MiB over HBM: longer than a launch


def _costs(f, *structs, **kw):
    return {mode: mtia_jax.jit(f, chip="mtia450", mode=mode, **kw).lower(*structs).compile().cost
            for mode in ("graph", "eager")}


def test_launch_models_are_graph_and_eager():
    assert set(LAUNCH_MODELS) == {"graph", "eager"}
    assert D_BIG > LAUNCH > D_SMALL  # the premises of the cases below
    with pytest.raises(KeyError):
        program_cost(import_closed_jaxpr(jax.make_jaxpr(jnp.sort)(SMALL)), CHIP, mode="lazy")


def _three_sorts(x):
    # sorts do not fuse with each other: three dependent kernels
    return jnp.sort(jnp.sort(jnp.sort(x) * 2.0) + 1.0)


def test_chain_of_three_tiny_kernels():
    costs = _costs(_three_sorts, SMALL)
    for mode, cost in costs.items():
        assert len(cost.kernels) == 3, mode
        for k in cost.kernels:
            assert k.hbm_s == pytest.approx(D_SMALL, rel=1e-12)
            assert k.compute_s < k.hbm_s  # each lasts its HBM time
        # a sort of 8: 8 x ceil(log2 8) comparisons on the vector units
        assert cost.kernels[0].compute_s == pytest.approx(24 / CHIP.vector_peak(np.float32))
    graph, eager = costs["graph"], costs["eager"]
    # graph: the first launch whole, then what each 3.5 ps kernel leaves exposed
    assert [k.launch_s for k in graph.kernels] == pytest.approx(
        [LAUNCH, LAUNCH - D_SMALL, LAUNCH - D_SMALL], rel=1e-12)
    assert [k.launch_s for k in eager.kernels] == [LAUNCH] * 3
    # the kernels depend on each other: they run back to back
    assert graph.time_s == pytest.approx(3 * LAUNCH + D_SMALL, rel=1e-12)
    assert eager.time_s == pytest.approx(3 * LAUNCH + 3 * D_SMALL, rel=1e-12)
    assert graph.launched_after == (((None, 1.0),), ((0, 1.0),), ((1, 1.0),))
    # the same through estimate(mode=) and program_cost(mode=)
    for mode, cost in costs.items():
        report = mtia_jax.estimate(_three_sorts, SMALL, chip="mtia450", mode=mode)
        assert report.time_s == pytest.approx(cost.time_s, rel=1e-12)
        module = run_passes(import_closed_jaxpr(jax.make_jaxpr(_three_sorts)(SMALL)),
                            PassContext(chip=CHIP))
        assert program_cost(module, CHIP, mode=mode).time_s == pytest.approx(cost.time_s, rel=1e-12)


def _big_then_small(x):
    y = x * 2.0
    return y, jnp.sort(y[:8])  # y is an output: the multiply is not fused into the sort


def test_a_small_kernel_after_a_big_one_pays_no_launch_in_graph_mode():
    costs = _costs(_big_then_small, S((BIG_N,), F32))
    for cost in costs.values():
        big, small = cost.kernels
        assert (big.kind, small.kind) == ("mul", "sort")
        assert big.hbm_s == pytest.approx(D_BIG, rel=1e-12)
        assert small.hbm_s == pytest.approx(D_SMALL, rel=1e-12)
    graph, eager = costs["graph"], costs["eager"]
    assert [k.launch_s for k in graph.kernels] == [LAUNCH, 0.0]  # max(0, launch - D_BIG) = 0
    assert [k.launch_s for k in eager.kernels] == [LAUNCH, LAUNCH]
    assert graph.time_s == pytest.approx(LAUNCH + D_BIG + D_SMALL, rel=1e-12)
    assert eager.time_s == pytest.approx(2 * LAUNCH + D_BIG + D_SMALL, rel=1e-12)


def test_a_big_kernel_after_a_small_one_pays_nearly_all_its_launch():
    def f(s, x):
        return jnp.sort(s), x * 2.0
    costs = _costs(f, SMALL, S((BIG_N,), F32))
    graph, eager = costs["graph"], costs["eager"]
    assert [k.kind for k in graph.kernels] == ["sort", "mul"]
    assert [k.launch_s for k in graph.kernels] == pytest.approx([LAUNCH, LAUNCH - D_SMALL], rel=1e-12)
    assert [k.launch_s for k in eager.kernels] == [LAUNCH, LAUNCH]


# ------------------------------------------------------------ loops wrap around

TRIPS = 5


def _sort_then_scan(x):
    def body(c, _):
        return jnp.sort(jnp.sort(c)[::-1]), None
    return lax.scan(body, jnp.sort(x), None, length=TRIPS)[0]


def test_scan_body_first_kernel_follows_the_body_last_kernel_on_later_trips():
    costs = _costs(_sort_then_scan, SMALL)
    graph, eager = costs["graph"], costs["eager"]
    top, first, last = graph.kernels
    assert top.path == "0" and first.path == "1/body/0" and last.path == "1/body/1"
    assert first.count == last.count == TRIPS
    # the body's first kernel follows the sort before the loop on the first
    # trip (1/5 of its executions) and the body's last kernel on the others
    assert graph.launched_after == (((None, 1.0),), ((0, 1 / TRIPS), (2, 1 - 1 / TRIPS)), ((1, 1.0),))
    assert top.launch_s == LAUNCH
    assert first.launch_s == pytest.approx((LAUNCH - D_SMALL) + (TRIPS - 1) * (LAUNCH - D_SMALL),
                                           rel=1e-12)
    assert last.launch_s == pytest.approx(TRIPS * (LAUNCH - D_SMALL), rel=1e-12)
    assert [k.launch_s for k in eager.kernels] == pytest.approx([LAUNCH, TRIPS * LAUNCH,
                                                                 TRIPS * LAUNCH], rel=1e-12)
    assert graph.time_s == pytest.approx((1 + 2 * TRIPS) * LAUNCH + D_SMALL, rel=1e-12)
    assert eager.time_s == pytest.approx((1 + 2 * TRIPS) * (LAUNCH + D_SMALL), rel=1e-12)


def test_a_big_last_kernel_of_the_body_hides_the_first_kernels_launch_on_later_trips():
    def f(s, x):
        def body(carry, _):
            s, x = carry
            return (jnp.sort(-s), x * 1.5), None
        return lax.scan(body, (jnp.sort(s), x), None, length=TRIPS)[0]

    costs = _costs(f, SMALL, S((BIG_N,), F32))
    graph, eager = costs["graph"], costs["eager"]
    top, small, big = graph.kernels
    assert big.kind == "mul" and big.hbm_s == pytest.approx(TRIPS * D_BIG, rel=1e-12)
    # the small kernel: launch - D_SMALL once (after the sort before the
    # loop), nothing on the later trips (after the 1.8 us multiply)
    assert small.launch_s == pytest.approx(LAUNCH - D_SMALL, rel=1e-12)
    # the multiply always follows the small kernel
    assert big.launch_s == pytest.approx(TRIPS * (LAUNCH - D_SMALL), rel=1e-12)
    assert [k.launch_s for k in eager.kernels] == pytest.approx([LAUNCH, TRIPS * LAUNCH,
                                                                 TRIPS * LAUNCH], rel=1e-12)


def _while_sorts(x, n):
    def body(state):
        i, c = state
        return i + 1, jnp.sort(jnp.sort(c)[::-1])
    return lax.while_loop(lambda s: s[0] < n, body, (0, jnp.sort(x)))[1]


def test_while_body_wraps_around_over_its_trips():
    for mode in ("graph", "eager"):
        report = mtia_jax.estimate(_while_sorts, SMALL, S((), jnp.int32), chip="mtia450",
                                   mode=mode, loop_trips=TRIPS)
        top, first, last = report.cost.kernels
        assert "/body/" in first.path and "/body/" in last.path
        assert first.count == last.count == TRIPS
        if mode == "graph":
            assert top.launch_s == LAUNCH
            assert first.launch_s == pytest.approx(TRIPS * (LAUNCH - D_SMALL), rel=1e-12)
            assert last.launch_s == pytest.approx(TRIPS * (LAUNCH - D_SMALL), rel=1e-12)
        else:
            assert [k.launch_s for k in (top, first, last)] == pytest.approx(
                [LAUNCH, TRIPS * LAUNCH, TRIPS * LAUNCH], rel=1e-12)
    # measured trips: the compiled loop ran 3 times
    compiled = mtia_jax.jit(_while_sorts, chip="mtia450").lower(SMALL, S((), jnp.int32)).compile()
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.float32)
    np.testing.assert_array_equal(compiled(x, np.int32(3)), jax.jit(_while_sorts)(x, np.int32(3)))
    top, first, last = compiled.cost.kernels
    assert first.count == 3
    assert first.launch_s == pytest.approx(3 * (LAUNCH - D_SMALL), rel=1e-12)


def test_a_program_that_starts_with_a_loop_pays_its_first_launch_whole():
    def f(x):
        def body(c, _):
            return jnp.sort(jnp.sort(c)[::-1]), None
        return lax.scan(body, x, None, length=TRIPS)[0]

    graph = _costs(f, SMALL)["graph"]
    first, last = graph.kernels
    assert first.path == "0/body/0"
    assert first.launch_s == pytest.approx(LAUNCH + (TRIPS - 1) * (LAUNCH - D_SMALL), rel=1e-12)
