"""Tiling and autotuning: legal tiles, the best score, caching, and the cost
model charging the chosen tile's re-reads and utilisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering import from_jaxpr, gemm_shapes
from lowering.passes import tiling
from lowering.pipeline import PassContext
from mtia_jax import chips


def _shape(m, n, k, dtype=jnp.bfloat16, batch=1):
    itemsize = jnp.dtype(dtype).itemsize
    return gemm_shapes.GemmShape(batch, m, n, k, batch * m * k * itemsize, batch * k * n * itemsize,
                            batch * m * n * itemsize, jnp.dtype(dtype).name)


def _fits(tile, shape, chip):
    itemsize = shape.lhs_bytes // (shape.batch * shape.m * shape.k)
    sram = 2 * itemsize * tile.k * (tile.m + tile.n) + tile.m * tile.n * 4
    gr, gc = tile.grid
    pm, pn = -(-tile.m // gr), -(-tile.n // gc)
    pe = 2 * itemsize * tile.k * (pm + pn) + pm * pn * 4
    return sram <= chip.sram_bytes and pe <= chip.pe_local_bytes and gr * gc == chip.pe_rows * chip.pe_cols


@pytest.mark.parametrize("chip_name", ["mtia300", "mtia450", "mtia_v2i", "h100"])
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (128, 4096, 14336), (8192, 8192, 8192), (7, 33, 100)])
def test_chosen_tile_fits_and_is_best_among_candidates(chip_name, mnk):
    chip = chips.get(chip_name)
    shape = _shape(*mnk)
    tile = tiling.choose_gemm_tile(shape, chip)
    assert _fits(tile, shape, chip)
    assert tile.m <= shape.m and tile.n <= shape.n and tile.k <= shape.k
    assert 0 < tile.efficiency <= 1
    # re-read bytes follow from the tile counts
    m_tiles, n_tiles = math.ceil(shape.m / tile.m), math.ceil(shape.n / tile.n)
    assert tile.extra_hbm_bytes == shape.lhs_bytes * (n_tiles - 1) + shape.rhs_bytes * (m_tiles - 1)


def test_square_matmul_tile_keeps_the_kernel_compute_bound():
    # 8192^3 bf16 needs 1.1 TFLOP and at least 403 MB; on every MTIA chip a
    # tile exists whose re-reads keep HBM time under compute time
    shape = _shape(8192, 8192, 8192)
    for name in ("mtia300", "mtia400", "mtia450", "mtia500"):
        chip = chips.get(name)
        tile = tiling.choose_gemm_tile(shape, chip)
        traffic = shape.lhs_bytes + shape.rhs_bytes + shape.out_bytes + tile.extra_hbm_bytes
        # power-of-two grids: no padding; only the K loop's fill and drain are lost
        assert tile.efficiency == pytest.approx(_pipeline_by_hand(8192, chip, "bf16"), rel=1e-12)
        assert traffic / chip.hbm_bandwidth <= shape.flops / chip.matmul_peak("bf16")


def _pipeline_by_hand(k, chip, cls):
    """A native 32 x 32 block streams K through the DPE, then fills and drains it."""
    flops_per_pe_cycle = chip.peak_flops[cls] / (chip.pe_rows * chip.pe_cols * chip.clock_hz)
    cycles = 2 * 32 * 32 * k / flops_per_pe_cycle
    return cycles / (cycles + 64)


def test_pipeline_efficiency_by_hand_on_mtia450():
    # 3.5 PFLOP/s bf16 over 128 PEs at 1.35 GHz: 20,255.6 FLOP per PE per cycle;
    # K = 8192: 2 x 1024 x 8192 / 20,255.6 = 828.3 cycles, + 64 -> 92.83 %
    chip = chips.get("mtia450")
    assert tiling.pipeline_efficiency(8192, chip.matmul_peak("bf16"), chip) == pytest.approx(
        828.28 / (828.28 + 64), rel=1e-4)
    # MX4 streams K six times faster, so the same fill and drain cost more
    assert tiling.pipeline_efficiency(8192, chip.matmul_peak("mx4"), chip) == pytest.approx(
        138.05 / (138.05 + 64), rel=1e-3)


def test_decode_gemv_is_memory_bound_with_low_pe_efficiency():
    chip = chips.get("mtia450")
    tile = tiling.choose_gemm_tile(_shape(1, 8192, 8192), chip)
    assert tile.m == 1 and tile.extra_hbm_bytes == 0
    assert tile.efficiency == pytest.approx(_pipeline_by_hand(8192, chip, "bf16") / tiling.DPE_NATIVE_TILE)


def test_tile_decisions_are_cached():
    chip = chips.get("mtia400")
    tiling.choose_gemm_tile.cache_clear()
    tiling.choose_gemm_tile(_shape(512, 512, 512), chip)
    tiling.choose_gemm_tile(_shape(512, 512, 512), chip)
    info = tiling.choose_gemm_tile.cache_info()
    assert info.hits == 1 and info.misses == 1


def test_tiles_show_in_as_text_and_set_the_modeled_rereads():
    a = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)
    compiled = mtia_jax.jit(jnp.matmul, chip="mtia300").lower(a, a).compile()
    tile = compiled.module.ops[0].attrs["tile"]
    assert f"tile={tile}" in compiled.as_text()
    base = 3 * 8192 * 8192 * 2
    assert compiled.cost_analysis()["hbm_bytes"] == base + tile.extra_hbm_bytes


def test_tiling_pass_annotates_fused_matmuls_convs_and_reductions():
    def f(x, w, k):
        y = jax.nn.relu(x @ w + 1.0)
        img = jax.lax.conv_general_dilated(x[None, None], k, (1, 1), "SAME")
        return y.sum(axis=1), img

    args = (jnp.ones((64, 128)), jnp.ones((128, 32)), jnp.ones((4, 1, 3, 3)))
    compiled = mtia_jax.jit(f).lower(*args).compile()
    tiled = [op for op in compiled.module.ops if "tile" in op.attrs]
    kinds = {op.kind for op in tiled}
    assert "conv_general_dilated" in kinds and "fused_kernel" in kinds
    got, want = mtia_jax.jit(f)(*args), jax.jit(f)(*args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_reduction_longer_than_sram_pays_for_partials():
    small_sram = chips.get("mtia450").replace(sram_bytes=1 << 20)
    module = from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(lambda x: x.sum(axis=1))(
        jax.ShapeDtypeStruct((4, 1 << 20), jnp.float32)))
    (op,) = [o for o in module.ops if o.kind == "reduce_sum"]
    tile = tiling.reduction_tile(op, small_sram)
    chunks = (1 << 20) // tile.k
    assert chunks > 1 and tile.extra_hbm_bytes == 2 * 4 * 4 * (chunks - 1)
    assert tiling.reduction_tile(op, chips.get("mtia450")).extra_hbm_bytes == 0
    assert tiling.run(module, PassContext(chip=small_sram)).ops[0].attrs["tile"] == tile
