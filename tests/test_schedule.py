"""The list scheduler: streams overlap, dependencies and shared HBM bandwidth hold."""

import jax
import jax.numpy as jnp
import pytest

import mtia_jax
from lowering import from_jaxpr
from runtime.cost_model import program_cost

CHIP = mtia_jax.chips.get("mtia450")


def _cost(fn, *shapes):
    module = from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*shapes))
    return program_cost(module, CHIP)


def test_independent_dma_kernel_overlaps_compute():
    a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    cost = _cost(lambda a, t: (a @ a, t.T), a, t)
    matmul, transpose = cost.kernels
    assert (matmul.stream, transpose.stream) == ("compute", "dma")
    assert transpose.start_s == 0.0  # does not wait for the matmul
    assert cost.time_s == pytest.approx(max(matmul.time_s, transpose.start_s + transpose.time_s))
    assert cost.time_s < sum(k.time_s for k in cost.kernels)


def test_dependent_kernels_wait_for_their_inputs():
    a = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)
    cost = _cost(lambda a: (a @ a).T, a)
    matmul, transpose = cost.kernels
    assert transpose.start_s == pytest.approx(matmul.start_s + matmul.time_s)
    assert cost.time_s == pytest.approx(matmul.time_s + transpose.time_s)


def test_memory_bound_kernels_on_two_streams_share_hbm_bandwidth():
    x = jax.ShapeDtypeStruct((8192, 8192), jnp.float32)
    cost = _cost(lambda x, y: (x + 1.0, y.T), x, x)
    add, transpose = cost.kernels
    both_bytes = add.hbm_bytes + transpose.hbm_bytes
    assert cost.time_s >= both_bytes / CHIP.hbm_bandwidth
    assert cost.time_s >= cost.roofline_time_s
