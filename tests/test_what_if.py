"""What-if studies: chip variants made with ``ChipSpec.replace`` or registered
by name drive ``jit`` and ``estimate`` with no code change."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from mtia_jax import chips

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import what_if  # noqa: E402

A = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)
B = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)


def matmul(a, b):
    return a @ b


def memory_time(chip, *structs) -> float:
    """Hand roofline of a memory-bound matmul: operand and result bytes over HBM bandwidth."""
    a, b = structs
    nbytes = (a.size + b.size + a.shape[0] * b.shape[1]) * 2
    return nbytes / chip.hbm_bandwidth


def test_estimate_takes_a_replaced_spec():
    base = chips.get("mtia450")
    fast = base.replace(hbm_bandwidth=base.hbm_bandwidth * 2)
    r_base = mtia_jax.estimate(matmul, A, B, chip=base)
    r_fast = mtia_jax.estimate(matmul, A, B, chip=fast)
    assert r_base.roofline_time_s == pytest.approx(memory_time(base, A, B), rel=1e-6)
    assert r_fast.roofline_time_s == pytest.approx(memory_time(fast, A, B), rel=1e-6)
    assert r_fast.time_s < r_base.time_s
    assert fast.sources["hbm_bandwidth"] == "user override"
    assert base.hbm_bandwidth == chips.get("mtia450").hbm_bandwidth  # the catalogue is untouched


def test_registered_variant_is_usable_by_name(monkeypatch):
    monkeypatch.setattr(chips, "_REGISTRY", dict(chips._REGISTRY))  # the registration ends with the test
    base = chips.get("mtia400")
    variant = base.replace(name="mtia400-hbm4", hbm_bandwidth=base.hbm_bandwidth * 4)
    chips.register(variant, overwrite=True)
    by_name = mtia_jax.estimate(matmul, A, B, chip="mtia400-hbm4")
    by_spec = mtia_jax.estimate(matmul, A, B, chip=variant)
    assert by_name.time_s == by_spec.time_s
    assert by_name.roofline_time_s == pytest.approx(memory_time(variant, A, B), rel=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        chips.register(variant)


def test_variant_gets_its_own_device():
    base = chips.get("mtia450")
    variant = base.replace(kernel_launch_s=base.kernel_launch_s * 3)
    dev_base, dev_variant = mtia_jax.devices(base)[0], mtia_jax.devices(variant)[0]
    assert dev_base is not dev_variant and dev_variant.chip is variant
    dev_base.stats.reset()
    dev_variant.stats.reset()
    f = mtia_jax.jit(lambda x: jnp.tanh(x) * 2, chip=variant)
    x = jnp.ones((256,), jnp.float32)
    np.testing.assert_array_equal(f(x), jax.jit(lambda x: jnp.tanh(x) * 2)(x))
    assert dev_variant.stats.calls == 1 and dev_base.stats.calls == 0
    assert dev_variant.stats.busy_s >= variant.kernel_launch_s


def test_what_if_example_sweeps_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(what_if, "SCALES", (0.5, 1.0, 2.0))
    monkeypatch.setattr(what_if, "BATCHES", (8,))
    out = tmp_path / "what_if.png"
    results = what_if.main(["--chip", "mtia450", "--out", str(out)])
    hbm = results[("HBM bandwidth", 8)]
    flops = results[("MX FLOP/s", 8)]
    assert hbm[0] < hbm[1] < hbm[2]  # decode follows HBM bandwidth
    assert hbm[2] / hbm[1] > 1.3
    assert flops[2] / flops[1] < 1.05  # and hardly follows matrix FLOPs
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
