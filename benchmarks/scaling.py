"""Modeled decode throughput of a Llama-3-70B-shaped model, and of
Mixtral-8x7B with expert parallelism, over mtia450 meshes.

    python benchmarks/scaling.py

Llama-3-70B: tensor parallel ("model" axis, Megatron sharding) alone, and
tensor x data parallel ("data" axis splitting the batch). Mixtral-8x7B
(``models.transformer``): its 8 experts split over an 8-way "model" axis
(expert parallelism, one expert per chip, tokens dispatched and returned by
all-to-all; attention heads tensor parallel over the same axis), times 1 to 8
data replicas; and, for comparison, the experts' FFN width split over "model"
instead (tensor parallel experts). One decode step (one new token per
sequence against a 2k KV cache), shapes only; every time is modeled.
"""

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import programs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mtia_jax  # noqa: E402
from models import transformer as tf  # noqa: E402

CHIP = "mtia450"
CACHE = 2048
PER_REPLICA_BATCH = 8


def step(config, data: int, model: int):
    batch = PER_REPLICA_BATCH * data
    mesh = mtia_jax.make_mesh((data, model), ("data", "model"), chip=CHIP)
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    return batch, mtia_jax.estimate(fn, *programs.llama_shapes(config, batch, CACHE), chip=CHIP, mesh=mesh,
                                    in_shardings=programs.llama_shardings(config, model),
                                    donate_argnums=(1, 2))  # the KV caches are written in place


def mixtral_step(data: int, model: int, rules: dict | None = None):
    """(batch, report) of one Mixtral-8x7B decode step on a data x model mesh."""
    cfg = tf.Config.preset("mixtral-8x7b")
    batch = PER_REPLICA_BATCH * data
    mesh = mtia_jax.make_mesh((data, model), ("data", "model"), chip=CHIP)
    pspecs, cspecs, tspec = tf.shardings(cfg, mesh, batch, rules)
    return batch, mtia_jax.estimate(functools.partial(tf.decode, cfg), tf.param_shapes(cfg),
                                    jax.ShapeDtypeStruct((batch,), jnp.int32), tf.cache_shapes(cfg, batch, CACHE),
                                    chip=CHIP, mesh=mesh, in_shardings=(pspecs, tspec, cspecs),
                                    donate_argnums=(2,))


def mixtral_table():
    print(f"\nMixtral-8x7B decode, bf16, KV cache {CACHE}, {PER_REPLICA_BATCH} sequences per data replica, "
          f"on {CHIP} (modeled)")
    print(f"{'chips':>5} {'layout':<22} {'batch':>5} {'step ms':>8} {'tokens/s':>9} {'collective %':>12} "
          f"{'HBM GB/dev':>10} {'fits':>5} {'estimate s':>10}")
    tp_experts = {**tf.SHARDING_RULES, "experts": None}
    layouts = [(d, "ep", None) for d in (1, 2, 4, 8)] + [(1, "tp experts", tp_experts)]
    for data, name, rules in layouts:
        start = time.perf_counter()
        batch, r = mixtral_step(data, 8, rules)
        wall = time.perf_counter() - start
        print(f"{data * 8:>5} {f'{data} data x 8 {name}':<22} {batch:>5} {r.time_s * 1e3:>8.2f} "
              f"{batch / r.time_s:>9.0f} {r.collective_time_s / r.time_s:>12.1%} "
              f"{r.peak_hbm_bytes / 1e9:>10.1f} {str(r.fits):>5} {wall:>10.2f}")


def main():
    config = programs.LLAMA_CONFIGS["llama3-70b"]
    print(f"Llama-3-70B decode, bf16, KV cache {CACHE}, {PER_REPLICA_BATCH} sequences per data replica, "
          f"on {CHIP} (modeled)")
    print(f"{'chips':>5} {'layout':<14} {'batch':>5} {'step ms':>8} {'tokens/s':>9} {'collective %':>12} "
          f"{'HBM GB/dev':>10} {'fits':>5} {'estimate s':>10}")
    layouts = [(1, m) for m in (8, 16, 32, 64)] + [(d, 8) for d in (1, 2, 4, 8, 9)]
    for data, model in layouts:
        start = time.perf_counter()
        batch, r = step(config, data, model)
        wall = time.perf_counter() - start
        print(f"{data * model:>5} {f'{data} data x {model} tp':<14} {batch:>5} {r.time_s * 1e3:>8.2f} "
              f"{batch / r.time_s:>9.0f} {r.collective_time_s / r.time_s:>12.1%} "
              f"{r.peak_hbm_bytes / 1e9:>10.1f} {str(r.fits):>5} {wall:>10.2f}")
    mixtral_table()


if __name__ == "__main__":
    main()
