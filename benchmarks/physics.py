"""The modeled timeline against physics: every invariant with its ratio.

    python benchmarks/physics.py

Shapes only (``mtia_jax.estimate``), on MTIA 450 unless stated. Every
"floor" below is computed by hand in this file from the shapes and the
chip's published HBM bandwidth, independently of the cost model:

1. Decode of the Llama-3-70B preset (``models.transformer.decode``, KV
   capacity 4096, the cache donated so it is written in place): modeled time
   against (weights + KV cache read + new KV rows + logits) / HBM bandwidth,
   in bf16 and under MX4 weights / MX8 activations, at batch 1 and 64; and
   the MX4 speed-up over bf16 at batch 1; the same decode as the serving
   engine's step (``paged_step``: the KV cache in a paged pool read through
   block tables) against the same floor, and with a 4x larger pool.
2. Loops: a ``while_loop`` of 100 trips of a 4096^2 matmul + tanh against
   100 x one trip; a ``fori_loop`` reading ``W[i]`` of a stacked
   (80, 8192, 8192) weight against the same loop as a ``scan``; one
   ``jnp.take`` row of a 128256 x 8192 table (HBM bytes).
3. The floor: modeled time >= roofline (``efficiency <= 1``) on the models
   and benchmark programs, and the roofline equal to the hand floor where
   one is computed.
4. The network: a 16 KB all-reduce over 72 chips against 20 us and against
   its floor (one hop, and the (p-1)/p N every device must receive over the
   link bandwidth); an all-gather beside an independent memory-bound
   ``x + 1`` against the slower of the two alone; Llama-3-70B decode at
   batch 8 on 64 chips against 8 (``benchmarks/programs.py``'s layout).

Each line prints the figure, the bound it is held to, and PASS or FAIL; the
exit status is 1 if any fails. Modeled figures are model outputs, not
measurements.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import pallas_kernels  # noqa: E402
import programs  # noqa: E402

import mtia_jax  # noqa: E402
from models import dlrm  # noqa: E402
from models import transformer as tf  # noqa: E402

S = jax.ShapeDtypeStruct
CHIP = "mtia450"
MX4 = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")
MX4_BITS = 4.25  # OCP MX: 4-bit elements + one 8-bit scale per 32 (hardware-facts §3.1)

RESULTS: list[bool] = []


def check(name: str, value: float, bound: str, ok: bool, unit: str = "") -> None:
    RESULTS.append(ok)
    print(f"  {'PASS' if ok else 'FAIL'}  {name:<62} {value:>10.4g}{unit}  ({bound})")


def _structs(tree):
    return jax.tree.map(lambda s: S(s.shape, s.dtype), tree)


# ------------------------------------------------------------ 1. decode

def decode_floor_s(cfg: tf.Config, batch: int, capacity: int, weight_bits: float, bandwidth: float) -> float:
    """Bytes a decode step must move, by hand: every weight once at its
    stored width (norm scales stay bf16, the embedding is read B rows), the
    whole K and V caches (attention reads every cached position up to the
    capacity), the new K/V row per sequence and layer, the float32 logits."""
    d, L, kv = cfg.d_model, cfg.layers, cfg.kv_heads * cfg.head_dim
    per_layer = d * cfg.heads * cfg.head_dim + 2 * d * kv + cfg.heads * cfg.head_dim * d + 3 * d * cfg.ffn
    matrices = L * per_layer + d * cfg.vocab  # + the output projection
    norms = (2 * L + 1) * d
    weight_bytes = matrices * weight_bits / 8 + norms * 2 + batch * d * 2
    cache = 2 * L * batch * capacity * kv * 2
    new_rows = 2 * L * batch * kv * 2
    logits = batch * cfg.vocab * 4
    return (weight_bytes + cache + new_rows + logits) / bandwidth


def decode_report(cfg, batch, capacity, precision):
    params = _structs(tf.param_shapes(cfg))
    cache = tf.cache_shapes(cfg, batch, capacity)
    return mtia_jax.estimate(functools.partial(tf.decode, cfg), params, S((batch,), jnp.int32), cache,
                             chip=CHIP, precision=precision, donate_argnums=(2,))


def paged_decode_report(cfg, batch, capacity, precision, *, block_size=16, pool_factor=1):
    """``models.transformer.paged_step`` of one decode token per sequence, each
    with a table of ``capacity / block_size`` blocks, from a pool of
    ``pool_factor`` times the blocks the tables hold."""
    width = capacity // block_size
    pool = jax.eval_shape(functools.partial(tf.init_kv_pool, cfg, pool_factor * batch * width, block_size))
    ids = lambda *shape: S(shape, jnp.int32)
    return mtia_jax.estimate(functools.partial(tf.paged_step, cfg), _structs(tf.param_shapes(cfg)),
                             ids(batch), ids(batch), ids(batch), ids(batch), ids(batch, width), ids(batch),
                             pool, chip=CHIP, precision=precision, donate_argnums=(7,))


def section_decode() -> None:
    print(f"1. Llama-3-70B decode on {CHIP}, KV capacity 4096, cache donated (modeled vs hand floor)")
    cfg = tf.Config.preset("llama3-70b")
    bandwidth = mtia_jax.chips.get(CHIP).hbm_bandwidth
    times = {}
    for batch, limit in ((1, 1.25), (64, 1.35)):
        for label, policy, bits in (("bf16", None, 16), ("mx4/mx8", MX4, MX4_BITS)):
            rep = decode_report(cfg, batch, 4096, policy)
            floor = decode_floor_s(cfg, batch, 4096, bits, bandwidth)
            times[batch, label] = rep.time_s
            print(f"        batch {batch:>2} {label:<8} modeled {rep.time_s * 1e3:8.3f} ms, hand floor "
                  f"{floor * 1e3:8.3f} ms, roofline {rep.roofline_time_s * 1e3:8.3f} ms, "
                  f"{len(rep.cost.kernels)} kernels")
            check(f"decode batch {batch} {label}: modeled / hand floor", rep.time_s / floor,
                  f"1 <= ratio <= {limit}", 1 <= rep.time_s / floor <= limit)
            check(f"decode batch {batch} {label}: roofline / hand floor", rep.roofline_time_s / floor,
                  "within 1 %", abs(rep.roofline_time_s / floor - 1) <= 0.01)
    speedup = times[1, "bf16"] / times[1, "mx4/mx8"]
    check("decode batch 1: MX4 speed-up over bf16", speedup, ">= 2.5", speedup >= 2.5, "x")
    # the serving engine's step: the same decode through a paged KV pool, whose
    # blocks the tables name are all that is read, however large the pool
    for batch, limit in ((1, 1.25), (64, 1.35)):
        for label, policy, bits in (("bf16", None, 16), ("mx4/mx8", MX4, MX4_BITS)):
            rep = paged_decode_report(cfg, batch, 4096, policy)
            floor = decode_floor_s(cfg, batch, 4096, bits, bandwidth)
            check(f"paged decode batch {batch} {label}: modeled / hand floor", rep.time_s / floor,
                  f"1 <= ratio <= {limit}", 1 <= rep.time_s / floor <= limit)
            check(f"paged decode batch {batch} {label}: roofline / hand floor",
                  rep.roofline_time_s / floor, "within 1 %", abs(rep.roofline_time_s / floor - 1) <= 0.01)
    grown = paged_decode_report(cfg, 64, 4096, None, pool_factor=4).time_s / \
        paged_decode_report(cfg, 64, 4096, None).time_s
    check("paged decode batch 64: a 4x larger pool / the pool of its blocks", grown, "<= 1.01",
          grown <= 1.01)


# ------------------------------------------------------------ 2. loops and touched bytes

def section_loops() -> None:
    print("2. Loops and touched bytes")
    x = S((4096, 4096), jnp.bfloat16)

    def while_100(x, w):
        return lax.while_loop(lambda c: c[0] < 100, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]

    one = mtia_jax.estimate(lambda x, w: jnp.tanh(x @ w), x, x, chip=CHIP).time_s
    loop = mtia_jax.estimate(while_100, x, x, chip=CHIP).time_s
    check("while_loop of 100 trips / (100 x one trip)", loop / (100 * one), ">= 0.9",
          loop >= 0.9 * 100 * one)

    stacked, h = S((80, 8192, 8192), jnp.bfloat16), S((1, 8192), jnp.bfloat16)
    fori = mtia_jax.estimate(lambda W, h: lax.fori_loop(0, 80, lambda i, h: jnp.tanh(h @ W[i]), h),
                             stacked, h, chip=CHIP).time_s
    scan = mtia_jax.estimate(lambda W, h: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, W)[0],
                             stacked, h, chip=CHIP).time_s
    check("fori_loop reading W[i] / the same loop as a scan", fori / scan, "<= 1.5", fori <= 1.5 * scan)
    floor = 80 * 8192 * 8192 * 2 / mtia_jax.chips.get(CHIP).hbm_bandwidth
    check("scan over 80 stacked weights / their bytes over HBM bandwidth", scan / floor, ">= 1",
          scan >= floor)

    table, index = S((128256, 8192), jnp.bfloat16), S((1,), jnp.int32)
    take = mtia_jax.estimate(lambda t, i: jnp.take(t, i, axis=0), table, index, chip=CHIP)
    check("jnp.take of one 16 KB row: HBM bytes", take.hbm_bytes / 1e6, "< 1 MB",
          take.hbm_bytes < 1e6, " MB")


# ------------------------------------------------------------ 3. the floor

def _programs():
    """(name, report) of programs the models and benchmarks build."""
    tiny = tf.Config.preset("tiny")
    params = _structs(tf.param_shapes(tiny))
    yield "tiny llama prefill", mtia_jax.estimate(
        functools.partial(tf.prefill, tiny), params, S((4, 32), jnp.int32), S((4,), jnp.int32),
        tf.cache_shapes(tiny, 4, 64), chip=CHIP)
    for batch in (1, 64):
        yield f"llama3-70b decode batch {batch} mx4", decode_report(
            tf.Config.preset("llama3-70b"), batch, 4096, MX4)
    yield "llama3-8b decode batch 8, cache not donated", mtia_jax.estimate(
        functools.partial(tf.decode, tf.Config.preset("llama3-8b")),
        _structs(tf.param_shapes(tf.Config.preset("llama3-8b"))), S((8,), jnp.int32),
        tf.cache_shapes(tf.Config.preset("llama3-8b"), 8, 2048), chip=CHIP)
    cfg = dlrm.Config.preset("tiny")
    yield "dlrm tiny forward batch 512", dlrm.estimate(cfg, 512, chip=CHIP)
    d = 1024
    block = {n: S(s.shape, jnp.bfloat16) for n, s in
             _structs(programs.block_params(jax.random.key(0), d)).items()}
    yield "transformer block 8 x 512 x 1024 bf16", mtia_jax.estimate(
        programs.transformer_block, S((8, 512, d), jnp.bfloat16), block, chip=CHIP)
    mlp = [(S((1024, 4096), jnp.bfloat16), S((4096,), jnp.bfloat16)),
           (S((4096, 1024), jnp.bfloat16), S((1024,), jnp.bfloat16))]
    yield "mlp 2048 x 1024 bf16", mtia_jax.estimate(programs.mlp, mlp, S((2048, 1024), jnp.bfloat16),
                                                      chip=CHIP)
    yield "rnn scan 128 steps", mtia_jax.estimate(
        programs.rnn_scan, (S((256, 256), jnp.float32), S((256, 256), jnp.float32)),
        S((128, 32, 256), jnp.float32), S((32, 256), jnp.float32), chip=CHIP)
    for name, kernel in (("tiled matmul", pallas_kernels.matmul),
                         ("FlashAttention forward", pallas_kernels.flash_attention)):
        shapes = ((S((2048, 2048), jnp.bfloat16),) * 2 if name == "tiled matmul"
                  else (S((16, 2048, 128), jnp.bfloat16),) * 3)
        yield f"Pallas {name}", mtia_jax.estimate(kernel, *shapes, chip=CHIP)


def section_floor() -> None:
    print("3. Modeled time >= roofline (efficiency <= 1)")
    for name, rep in _programs():
        check(f"{name}: modeled / roofline", rep.time_s / rep.roofline_time_s, ">= 1",
              rep.time_s >= rep.roofline_time_s * (1 - 1e-9))


def _all_reduce_16kb():
    mesh = mtia_jax.make_mesh((72,), ("model",), chip=CHIP)
    return mtia_jax.estimate(lambda x: x.sum(0), S((72, 4096), jnp.float32), chip=CHIP, mesh=mesh,
                             in_shardings=(jax.sharding.PartitionSpec("model"),),
                             out_shardings=jax.sharding.PartitionSpec())


def _tp_decode(chips: int):
    config = programs.LLAMA_CONFIGS["llama3-70b"]
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    return mtia_jax.estimate(fn, *programs.llama_shapes(config, 8, 4096), chip=CHIP,
                             mesh=programs.llama_mesh(config, 1, chips, chip=CHIP),
                             in_shardings=programs.llama_shardings(config, chips), donate_argnums=(1, 2))


def section_network() -> None:
    print("4. The network")
    chip = mtia_jax.chips.get(CHIP)
    (kernel,) = [k for k in _all_reduce_16kb().cost.kernels if k.stream == "network"]
    n, p = 4096 * 4, 72
    floor = chip.scaleup_link_latency_s + (p - 1) / p * n / chip.scaleup_link_bandwidth
    check(f"all-reduce of 16 KB over 72 chips ({kernel.algorithm}), launch included: us",
          kernel.time_s * 1e6, "<= 20", kernel.time_s <= 20e-6)
    check("its network time / one hop + (p-1)/p N over the link", kernel.transfer_s / floor, ">= 1",
          kernel.transfer_s >= floor)
    P = jax.sharding.PartitionSpec
    mesh = mtia_jax.make_mesh((8,), ("model",), chip=CHIP)
    a, x = S((8 * 2**20 * 2,), jnp.float32), S((2**28,), jnp.float32)
    kw = dict(chip=CHIP, mesh=mesh)
    both = mtia_jax.estimate(lambda a, x: (a * 1, x + 1), a, x, in_shardings=(P("model"), P()),
                             out_shardings=(P(), P()), **kw).time_s
    alone = max(mtia_jax.estimate(lambda a: a * 1, a, in_shardings=(P("model"),), out_shardings=P(), **kw).time_s,
                mtia_jax.estimate(lambda x: x + 1, x, in_shardings=(P(),), out_shardings=P(), **kw).time_s)
    check("all-gather beside x + 1 / the slower alone", both / alone, "<= 1.3", both <= 1.3 * alone)
    ratio = _tp_decode(64).time_s / _tp_decode(8).time_s
    check("70B decode B8 KV 4096: 64 chips / 8 chips", ratio, "<= 1.1", ratio <= 1.1)


def main() -> int:
    start = time.perf_counter()
    print(f"Physics of the modeled timeline on {CHIP} (model outputs, not measurements)\n")
    for section in (section_decode, section_loops, section_floor, section_network):
        section()
        print()
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} of {len(RESULTS)} invariants hold "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
