"""The power model (runtime/power.py): energy by hand from the kernels'
work at peak and bytes at full bandwidth, the TDP never exceeded, and the
idle floor."""

import functools

import jax
import jax.numpy as jnp
import pytest

import mtia_jax
from runtime import power

S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("chip", ["mtia450", "h100"])
def test_energy_of_a_matmul_by_hand(chip):
    report = mtia_jax.estimate(jnp.matmul, S((4096, 4096), jnp.bfloat16), S((4096, 4096), jnp.bfloat16),
                               chip=chip)
    spec = mtia_jax.chips.get(chip)
    (kernel,) = report.cost.kernels
    idle = power.IDLE_FRACTION * spec.tdp_watts
    dynamic = spec.tdp_watts - idle
    at_peak = 2 * 4096 ** 3 / spec.matmul_peak(jnp.bfloat16)  # the FLOPs at the matrix peak
    full_bandwidth = kernel.hbm_bytes / spec.hbm_bandwidth
    want = (idle * report.time_s + dynamic * power.COMPUTE_SHARE * at_peak
            + dynamic * power.HBM_SHARE * full_bandwidth)
    e = report.energy()
    assert e.joules == pytest.approx(want, rel=1e-9)
    assert e.idle_joules + e.compute_joules + e.hbm_joules == pytest.approx(e.joules)
    assert idle <= e.watts <= spec.tdp_watts


def _programs():
    x = S((8192, 8192), jnp.bfloat16)
    yield "compute bound", functools.partial(mtia_jax.estimate, jnp.matmul, x, x)
    yield "memory bound", functools.partial(mtia_jax.estimate, lambda a: a * 2 + 1, S((2 ** 28,), jnp.float32))
    yield "both streams", functools.partial(
        mtia_jax.estimate, lambda a, b: (jnp.tanh(a @ a), b + 1), S((4096, 4096), jnp.bfloat16),
        S((2 ** 27,), jnp.float32))


@pytest.mark.parametrize("chip", ["mtia400", "mtia450", "mtia500", "h100", "h200"])
@pytest.mark.parametrize("idle_fraction, compute_share", [(0.3, 0.6), (0.0, 1.0), (0.0, 0.0), (1.0, 0.5)])
def test_average_power_stays_between_idle_and_tdp(chip, idle_fraction, compute_share):
    spec = mtia_jax.chips.get(chip)
    for name, estimate in _programs():
        e = estimate(chip=chip).energy(idle_fraction=idle_fraction, compute_share=compute_share)
        assert idle_fraction * spec.tdp_watts * (1 - 1e-9) <= e.watts <= spec.tdp_watts * (1 + 1e-9), name


def test_a_memory_bound_kernel_near_full_bandwidth_draws_close_to_idle_plus_the_hbm_share():
    spec = mtia_jax.chips.get("mtia450")
    report = mtia_jax.estimate(lambda a: a + 1, S((2 ** 28,), jnp.float32), chip="mtia450")
    e = report.energy(idle_fraction=0.3, compute_share=0.6)
    # the HBM busy nearly all the time, the vector units a sliver of it
    hbm_only = 0.3 * spec.tdp_watts + 0.7 * spec.tdp_watts * 0.4
    assert hbm_only * 0.9 <= e.watts <= hbm_only + 0.7 * spec.tdp_watts * 0.6 * 0.05


def test_assumptions_out_of_range_are_errors():
    report = mtia_jax.estimate(jnp.sin, S((1024,), jnp.float32), chip="mtia450")
    with pytest.raises(ValueError, match="fractions in"):
        report.energy(idle_fraction=1.5)
