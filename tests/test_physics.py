"""The modeled timeline obeys physics on the patterns real programs use: the
figures of benchmarks/physics.py, each against a floor computed by hand from
the shapes and the chip's published HBM bandwidth (shapes only, no numerics).
Every other program the suite builds is held to modeled >= roofline by
tests/conftest.py."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import physics  # noqa: E402

import mtia_jax  # noqa: E402
from models import transformer as tf  # noqa: E402

S = jax.ShapeDtypeStruct
BANDWIDTH = mtia_jax.chips.get("mtia450").hbm_bandwidth  # 18.4 TB/s [M26]
LLAMA_70B = tf.Config.preset("llama3-70b")


def test_hand_floor_of_a_70b_decode_step():
    # 70.55e9 parameters with the untied head: matrices 8192 x (8192 + 2 x 1024 + 8192 +
    # 3 x 28672) per layer x 80 + 8192 x 128256, at 2 bytes; the KV cache 2 x 80 x 4096 x
    # 1024 x 2 bytes = 1.342 GB; at 18.4 TB/s: 7.63 ms (the figure of the issue this
    # floor was written for)
    floor = physics.decode_floor_s(LLAMA_70B, 1, 4096, 16, BANDWIDTH)
    assert floor == pytest.approx(7.628e-3, rel=1e-3)


@pytest.mark.parametrize("batch, limit", [(1, 1.25), (64, 1.35)])
@pytest.mark.parametrize("policy, bits", [(None, 16), (physics.MX4, physics.MX4_BITS)])
def test_70b_decode_is_near_its_floor_and_the_roofline_is_that_floor(batch, limit, policy, bits):
    report = physics.decode_report(LLAMA_70B, batch, 4096, policy)
    floor = physics.decode_floor_s(LLAMA_70B, batch, 4096, bits, BANDWIDTH)
    assert 1.0 <= report.time_s / floor <= limit
    assert report.roofline_time_s == pytest.approx(floor, rel=0.01)


@pytest.mark.parametrize("batch, limit", [(1, 1.25), (64, 1.35)])
@pytest.mark.parametrize("policy, bits", [(None, 16), (physics.MX4, physics.MX4_BITS)])
def test_paged_70b_decode_is_near_the_same_floor(batch, limit, policy, bits):
    """The serving engine's step (paged_step) over a paged pool reads the blocks
    its tables name: the contiguous decode's floor holds for it too."""
    report = physics.paged_decode_report(LLAMA_70B, batch, 4096, policy)
    floor = physics.decode_floor_s(LLAMA_70B, batch, 4096, bits, BANDWIDTH)
    assert 1.0 <= report.time_s / floor <= limit
    assert report.roofline_time_s == pytest.approx(floor, rel=0.01)


def test_paged_decode_does_not_pay_for_the_pool_it_does_not_read():
    exact = physics.paged_decode_report(LLAMA_70B, 64, 4096, None)
    grown = physics.paged_decode_report(LLAMA_70B, 64, 4096, None, pool_factor=4)
    assert grown.time_s == pytest.approx(exact.time_s, rel=0.01)
    assert grown.roofline_time_s == pytest.approx(exact.roofline_time_s, rel=1e-6)


def test_mx4_speeds_up_70b_decode_by_at_least_2_5x():
    bf16 = physics.decode_report(LLAMA_70B, 1, 4096, None).time_s
    mx4 = physics.decode_report(LLAMA_70B, 1, 4096, physics.MX4).time_s
    assert bf16 / mx4 >= 2.5


def test_an_undonated_cache_is_copied_once_and_the_floor_writes_it_whole():
    cfg = tf.Config.preset("llama3-8b")
    args = (physics._structs(tf.param_shapes(cfg)), S((8,), jnp.int32), tf.cache_shapes(cfg, 8, 2048))
    fn = functools.partial(tf.decode, cfg)
    donated = mtia_jax.estimate(fn, *args, donate_argnums=(2,))
    kept = mtia_jax.estimate(fn, *args)
    cache_bytes = 2 * 32 * 8 * 2048 * 8 * 128 * 2
    copies = [k for k in kept.cost.kernels if k.kind == "copy"]
    assert len(copies) == 2 and sum(k.hbm_bytes for k in copies) == 2 * cache_bytes  # read + write
    assert not [k for k in donated.cost.kernels if k.kind == "copy"]
    assert kept.cost.min_hbm_bytes - donated.cost.min_hbm_bytes == pytest.approx(cache_bytes, rel=1e-3)


def test_while_loop_of_100_trips_costs_100_trips():
    x = S((4096, 4096), jnp.bfloat16)
    loop = lambda x, w: lax.while_loop(lambda c: c[0] < 100,
                                       lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]
    one = mtia_jax.estimate(lambda x, w: jnp.tanh(x @ w), x, x).time_s
    assert mtia_jax.estimate(loop, x, x).time_s >= 0.9 * 100 * one


def test_fori_loop_reading_stacked_weights_costs_what_the_scan_does():
    stacked, h = S((80, 8192, 8192), jnp.bfloat16), S((1, 8192), jnp.bfloat16)
    fori = mtia_jax.estimate(lambda W, h: lax.fori_loop(0, 80, lambda i, h: jnp.tanh(h @ W[i]), h),
                             stacked, h).time_s
    scan = mtia_jax.estimate(lambda W, h: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, W)[0],
                             stacked, h).time_s
    assert fori <= 1.5 * scan
    assert scan >= 80 * 8192 * 8192 * 2 / BANDWIDTH  # every weight byte once


def test_take_of_one_row_reads_that_row():
    report = mtia_jax.estimate(lambda t, i: jnp.take(t, i, axis=0), S((128256, 8192), jnp.bfloat16),
                               S((1,), jnp.int32))
    # one 16 KB row read and written (the index is an immediate)
    assert report.hbm_bytes == 2 * 8192 * 2
    assert report.cost.min_hbm_bytes == 2 * 8192 * 2
