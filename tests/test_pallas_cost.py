"""The modeled time of Pallas kernels (runtime/pallas_cost.py) against the
DMA / compute formula computed by hand from the chip's constants, the
physical floor, the block-set check, and autotuning."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering.passes.tiling import DPE_FILL_DRAIN_CYCLES, DPE_NATIVE_TILE
from mtia_jax.errors import PallasBlockError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import pallas_kernels  # noqa: E402

S = jax.ShapeDtypeStruct
CHIP = "mtia450"


def _kernel(report):
    (k,) = [k for k in report.cost.kernels if k.kind.startswith("pallas_call[")]
    return k


@pytest.mark.parametrize("m, n, k, bm, bn, bk", [(1024, 1024, 1024, 128, 128, 256),
                                                  (512, 2048, 512, 64, 256, 512)])
def test_tiled_matmul_time_follows_the_dma_compute_formula(m, n, k, bm, bn, bk):
    chip = mtia_jax.chips.get(CHIP)
    report = mtia_jax.estimate(functools.partial(pallas_kernels.matmul, bm=bm, bn=bn, bk=bk),
                               S((m, k), jnp.bfloat16), S((k, n), jnp.bfloat16), chip=CHIP)
    kernel = _kernel(report)
    pes = chip.pe_rows * chip.pe_cols
    tiles = (m // bm) * (n // bn)             # parallel (i, j) iterations
    units = min(pes, tiles)
    steps = -(-tiles // units) * (k // bk)    # the busiest PE: its (i, j) tiles, each over every k
    # one step's dot on one PE: the output block padded to the DPE's native block,
    # the K stream of bk against the array's fill and drain
    peak_pe = chip.matmul_peak(jnp.bfloat16) / pes
    pad = (bm * bn) / (-(-bm // DPE_NATIVE_TILE) * DPE_NATIVE_TILE * -(-bn // DPE_NATIVE_TILE) * DPE_NATIVE_TILE)
    k_cycles = 2 * DPE_NATIVE_TILE ** 2 * bk / (peak_pe / chip.clock_hz)
    pipe = k_cycles / (k_cycles + DPE_FILL_DRAIN_CYCLES)
    matrix = 2 * bm * bn * bk / (peak_pe * chip.matmul_efficiency * pad * pipe)
    # and its vector work, at the PE's share of the vector rate: the += of the
    # f32 output block, and the zero fill of the first k step (its average)
    vector = (bm * bn + bm * bn / (k // bk)) / (chip.vector_peak(np.float32) / pes)
    bandwidth = chip.hbm_bandwidth * chip.hbm_efficiency
    fill = units * (bm * bk + bk * bn) * 2 / bandwidth
    drain = units * bm * bn * 4 / bandwidth
    # x's block (i, k) and w's (k, j) change at every step; o's (i, j) once per tile
    fetched = (m // bm) * (n // bn) * (k // bk) * (bm * bk + bk * bn) * 2 + m * n * 4
    assert kernel.hbm_bytes == fetched
    assert kernel.hbm_s == pytest.approx(fetched / bandwidth, rel=1e-12)
    assert kernel.matrix_s == pytest.approx(steps * matrix, rel=1e-9)
    assert kernel.vector_s <= steps * vector * (1 + 1e-9)
    assert kernel.compute_s == pytest.approx(max(steps * matrix, kernel.vector_s) + fill + drain, rel=1e-9)
    assert kernel.time_s == pytest.approx(max(kernel.compute_s, kernel.hbm_s) + chip.kernel_launch_s, rel=1e-9)
    # never below the floor: the FLOPs at peak, the bytes the blocks move over the bandwidth
    assert report.time_s >= 2 * m * n * k / chip.matmul_peak(jnp.bfloat16)
    assert report.time_s >= report.roofline_time_s


def test_a_block_set_larger_than_a_processing_element_holds_is_a_clear_error():
    big = functools.partial(pallas_kernels.matmul, bm=1024, bn=1024, bk=1024)
    with pytest.raises(PallasBlockError, match=r"(?s)needs .* KiB of on-chip memory.*args\[0\]: block \(1024, 1024\)"):
        mtia_jax.estimate(big, S((2048, 2048), jnp.bfloat16), S((2048, 2048), jnp.bfloat16), chip=CHIP)


def test_autotune_picks_the_candidate_with_the_lowest_modeled_time():
    x = S((1024, 1024), jnp.bfloat16)
    configs = [dict(bm=bm, bn=bn, bk=bk) for bm in (64, 128, 256) for bn in (128, 256) for bk in (128, 512)]
    configs.append(dict(bm=1024, bn=1024, bk=1024))  # does not fit a PE
    result = mtia_jax.pallas.autotune(lambda **c: functools.partial(pallas_kernels.matmul, **c),
                                      configs, x, x, chip=CHIP)
    timed = [c for c in result.candidates if c.time_s is not None]
    assert len(timed) == len(configs) - 1
    assert result.best.time_s == min(c.time_s for c in timed)
    # each candidate's time is that of its own estimate
    again = mtia_jax.estimate(functools.partial(pallas_kernels.matmul, **result.config), x, x, chip=CHIP)
    assert again.time_s == result.best.time_s
    (skipped,) = [c for c in result.candidates if c.time_s is None]
    assert "on-chip memory" in skipped.note
    table = result.table()
    assert table.splitlines()[0].startswith(f"autotune on {CHIP}") and "modeled" in table
    assert len(table.splitlines()) == 2 + len(configs)


def test_parallel_dimensions_spread_over_the_processing_elements():
    """The same kernel with every grid dimension sequential runs on one PE."""
    x = S((512, 512), jnp.bfloat16)

    def sequential(a, b):
        return jax.experimental.pallas.pallas_call(
            lambda x_ref, w_ref, o_ref: o_ref.__setitem__(Ellipsis, jnp.dot(
                x_ref[...], w_ref[...], preferred_element_type=jnp.float32)),
            out_shape=S((512, 512), jnp.float32), grid=(4, 4),
            in_specs=[jax.experimental.pallas.BlockSpec((128, 512), lambda i, j: (i, 0)),
                      jax.experimental.pallas.BlockSpec((512, 128), lambda i, j: (0, j))],
            out_specs=jax.experimental.pallas.BlockSpec((128, 128), lambda i, j: (i, j)))(a, b)

    parallel = functools.partial(pallas_kernels.matmul, bm=128, bn=128, bk=512)
    one_pe = _kernel(mtia_jax.estimate(sequential, x, x, chip=CHIP))
    spread = _kernel(mtia_jax.estimate(parallel, x, x, chip=CHIP))
    assert one_pe.matrix_s == pytest.approx(16 * spread.matrix_s, rel=1e-9)


def _small_inputs():
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    normal = lambda shape, dtype=jnp.bfloat16: jax.random.normal(next(keys), shape, jnp.float32).astype(dtype)
    x, w = normal((128, 256)), normal((256, 128)) / 16
    q, k, v = normal((2, 128, 64)), normal((2, 128, 64)), normal((2, 128, 64))
    w_mx = mtia_jax.mx.quantize(normal((256, 128), jnp.float32) / 16, "mx4", axis=0)
    pk = pallas_kernels
    return {
        "tiled matmul": (functools.partial(pk.matmul, bm=64, bn=64, bk=128),
                         functools.partial(jnp.dot, preferred_element_type=jnp.float32), (x, w), 1e-5),
        "rmsnorm matmul": (functools.partial(pk.rmsnorm_matmul, bm=64, bn=64), pk.rmsnorm_matmul_reference,
                           (x, 1 + normal((256,)) / 8, w), 2e-2),
        "flash attention": (functools.partial(pk.flash_attention, bq=64, bkv=32), pk.attention_reference,
                            (q, k, v), 2e-2),
        "mx4 matmul": (functools.partial(pk.mx4_matmul, bm=64, bn=64), pk.mx4_matmul_reference,
                       (x.astype(jnp.float32), w_mx), 1e-5),
    }


@pytest.mark.parametrize("name", list(_small_inputs()))
def test_example_kernels_equal_interpret_mode_and_their_reference_above_the_floor(name):
    kernel, reference, args, tol = _small_inputs()[name]
    compiled = mtia_jax.jit(kernel, chip=CHIP)
    got = compiled(*args)
    interpreted = jax.jit(functools.partial(kernel, interpret=True))(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(interpreted))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference(*args), np.float32),
                               rtol=tol, atol=tol)
    report = mtia_jax.estimate(kernel, *args, chip=CHIP)
    kernel_cost = _kernel(report)
    chip = mtia_jax.chips.get(CHIP)
    assert np.isfinite(report.time_s) and report.time_s >= report.roofline_time_s > 0
    # the floor by hand: the bytes the blocks move over the bandwidth, the FLOPs at peak
    assert kernel_cost.time_s >= kernel_cost.hbm_bytes / chip.hbm_bandwidth
    assert kernel_cost.time_s >= kernel_cost.flops / chip.matmul_peak(jnp.float32 if name == "mx4 matmul"
                                                                      else jnp.bfloat16) * (1 - 1e-9)
