"""Cost model v0 and the memory plan, against hand computation and XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering import from_jaxpr
from mtia_jax import chips
from runtime.cost_model import program_cost
from runtime.memory import plan_memory
from mtia_jax.errors import HBMCapacityError


@pytest.mark.parametrize("chip_name", ["mtia400", "mtia450", "h100"])
def test_large_bf16_matmul_time_is_the_hand_computed_roofline(chip_name):
    m, k, n = 8192, 8192, 8192
    a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    compiled = mtia_jax.jit(jnp.matmul, chip=chip_name).lower(a, b).compile()
    cost = compiled.cost_analysis()
    chip = chips.get(chip_name)
    flops = 2 * m * k * n
    nbytes = 2 * (m * k + k * n + m * n)
    roofline = max(flops / chip.matmul_peak(jnp.bfloat16), nbytes / chip.hbm_bandwidth)
    assert cost["flops"] == flops
    assert cost["bytes accessed"] == nbytes
    assert cost["roofline_time_s"] == pytest.approx(roofline, rel=1e-12)
    # the chosen tile re-reads operands and may leave some PEs idle
    tile = compiled.module.ops[0].attrs["tile"]
    assert cost["hbm_bytes"] == nbytes + tile.extra_hbm_bytes
    # at the chip's achievable fractions of peak (h100: fitted, docs/validation.md)
    expected = max(flops / (chip.matmul_peak(jnp.bfloat16) * tile.efficiency * chip.matmul_efficiency),
                   cost["hbm_bytes"] / (chip.hbm_bandwidth * chip.hbm_efficiency)) + chip.kernel_launch_s
    assert cost["time_s"] == pytest.approx(expected, rel=1e-12)
    if chip_name.startswith("mtia"):  # power-of-two PE grids: only the K loop's fill and drain
        # 2 x 32 x 32 x K FLOP per native block over FLOP per PE per cycle, + 64 cycles
        cycles = 2 * 32 * 32 * k / (chip.peak_flops["bf16"] / (chip.pe_rows * chip.pe_cols * chip.clock_hz))
        assert tile.efficiency == pytest.approx(cycles / (cycles + 64), rel=1e-12)
        assert cost["time_s"] == pytest.approx(roofline / tile.efficiency + chip.kernel_launch_s, rel=1e-12)
    assert cost["kernels"] == 1


def test_matmul_roofline_on_two_chips_by_hand():
    # 8192^3 bf16: 1.0995e12 FLOP; compute-bound on both chips.
    # mtia450: 3.5e15 FLOP/s bf16 [M26] -> 314.146 us; mtia400: 3.0e15 -> 366.504 us
    shapes = [jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)] * 2
    for name, expected_us in [("mtia450", 314.1462), ("mtia400", 366.5039)]:
        cost = mtia_jax.jit(jnp.matmul, chip=name).lower(*shapes).compile().cost_analysis()
        assert cost["roofline_time_s"] * 1e6 == pytest.approx(expected_us, rel=1e-5)


@pytest.mark.parametrize("fn, shapes", [
    (lambda a, b: a @ b, [(64, 128), (128, 32)]),
    (lambda a, b: jnp.einsum("bij,bjk->bik", a, b), [(4, 16, 8), (4, 8, 12)]),
    (lambda a, b: jnp.einsum("ij,kj->ik", a, b), [(10, 7), (5, 7)]),
])
def test_contraction_flops_match_xla(fn, shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    ours = mtia_jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
    xla = jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
    assert ours == xla


def test_elementwise_program_is_memory_bound_and_counts_bytes():
    chip = chips.get("mtia450")
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    compiled = mtia_jax.jit(lambda x: x * 2.0, chip="mtia450").lower(x).compile()
    cost = compiled.cost_analysis()
    nbytes = 2 * 4096 * 4096 * 4  # read x, write the result; the scalar is an immediate
    assert cost["hbm_bytes"] == nbytes
    assert cost["flops"] == 4096 * 4096
    assert cost["time_s"] == pytest.approx(nbytes / chip.hbm_bandwidth + chip.kernel_launch_s)
    assert compiled.cost.kernels[0].bound == "memory"
    small = mtia_jax.jit(lambda x: x * 2.0).lower(jax.ShapeDtypeStruct((8,), jnp.float32)).compile()
    assert small.cost.kernels[0].bound == "launch"


def test_transcendentals_counted_like_xla():
    x = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    fn = lambda x: jnp.exp(x) + jnp.tanh(x)
    ours = mtia_jax.jit(fn).lower(x).compile().cost_analysis()
    xla = jax.jit(fn).lower(x).compile().cost_analysis()
    assert ours["transcendentals"] == xla["transcendentals"] == 2 * 32 * 16
    assert ours["flops"] == xla["flops"] == 32 * 16


def _unfused(fn, *args):
    return from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args))


def test_views_are_not_kernels():
    module = _unfused(lambda x: (x.reshape(16, 8) + 1).reshape(128), jnp.ones((8, 16)))
    cost = program_cost(module, chips.get("mtia450"))
    assert [k.kind for k in cost.kernels] == ["add"]


def test_cost_analysis_keys_are_numbers_and_efficiency_at_most_one():
    def f(x, w):
        return jax.nn.softmax(jnp.tanh(x @ w))

    compiled = mtia_jax.jit(f).lower(jnp.ones((64, 128)), jnp.ones((128, 256))).compile()
    cost = compiled.cost_analysis()
    for key in ("flops", "bytes accessed", "hbm_bytes", "time_s", "roofline_time_s", "peak_hbm_bytes"):
        assert isinstance(cost[key], float) and cost[key] > 0, key
    assert 0 < cost["efficiency"] <= 1
    assert cost["time_s"] >= cost["roofline_time_s"]
    assert "modeled" in compiled.kernel_table()


def test_peak_hbm_counts_live_buffers_and_reuses_dead_ones_in_place():
    n = 1 << 20
    x = jnp.ones((n,))

    def chain(x):
        a = x + 1      # x, a
        b = a * 2      # written over a, which dies here
        return b - 1   # written over b

    def diamond(x):
        a = x + 1      # x, a
        b = a * 2      # x, a, b: a is still needed
        return a + b   # written over a or b

    assert plan_memory(_unfused(chain, x)).peak_bytes == 2 * 4 * n
    assert plan_memory(_unfused(diamond, x)).peak_bytes == 3 * 4 * n


def test_hbm_overflow_lists_the_five_largest_live_buffers_with_source_lines():
    def f(x):
        a = x @ x     # 1
        b = a @ x     # 2
        c = jnp.tanh(b) @ a  # 3, 4
        return c + b + a

    big = jax.ShapeDtypeStruct((1 << 15, 1 << 15), jnp.float32)  # 4 GiB each
    tiny = chips.get("mtia450").replace(hbm_bytes=12 * 2**30)
    with pytest.raises(HBMCapacityError) as info:
        mtia_jax.jit(f, chip=tiny).lower(big).compile()
    rows = [line for line in str(info.value).splitlines() if "GiB  " in line]
    assert 1 <= len(rows) <= 5
    assert all("f32[32768,32768]" in row for row in rows)
    assert any(f"{__file__}:" in row for row in rows)


def test_hbm_overflow_fails_to_compile_naming_the_buffers():
    big = jax.ShapeDtypeStruct((1 << 17, 1 << 17), jnp.float32)  # 64 GiB each

    def f(x, y):
        return x + y

    with pytest.raises(HBMCapacityError) as info:
        mtia_jax.jit(f, chip="h100").lower(big, big).compile()
    message = str(info.value)
    assert "h100" in message and "argument 0: f32[131072,131072]" in message and "GiB" in message
    assert "74.506 GiB" in message  # the capacity: 80e9 bytes
    # the same program fits in MTIA 450's 288 GB
    mtia_jax.jit(f, chip="mtia450").lower(big, big).compile()


def test_dynamic_update_slice_is_in_place():
    # a KV-cache update: only the new entries move, and the cache is not copied
    cache = jax.ShapeDtypeStruct((64, 2048, 8, 128), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((64, 1, 8, 128), jnp.bfloat16)
    f = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = mtia_jax.jit(f, donate_argnums=0).lower(cache, new, index).compile()
    (kernel,) = [k for k in compiled.cost.kernels if k.kind == "dynamic_update_slice"]
    assert kernel.hbm_bytes == 2 * 64 * 8 * 128 * 2  # update in and out; the indices are immediates
    assert "in_place=True" in compiled.as_text()
    cache_and_update = 64 * 2048 * 8 * 128 * 2 + 64 * 8 * 128 * 2
    # no second copy of the cache (only a few scalar bytes beside it)
    assert 0 <= compiled.cost_analysis()["peak_hbm_bytes"] - cache_and_update < 64


def test_dynamic_update_slice_of_a_buffer_the_caller_keeps_copies_it():
    cache = jax.ShapeDtypeStruct((64, 2048, 8, 128), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((64, 1, 8, 128), jnp.bfloat16)
    f = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1)
    compiled = mtia_jax.jit(f).lower(cache, new, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    (kernel,) = [k for k in compiled.cost.kernels if k.kind == "dynamic_update_slice"]
    # not donated: the rest of the cache is read and written around the update
    assert kernel.hbm_bytes == 2 * 64 * 2048 * 8 * 128 * 2
    assert "in_place=False" in compiled.as_text()
