"""Modeled decode throughput of a Llama-3-70B-shaped model over mtia450 meshes.

    python benchmarks/scaling.py

Tensor parallel ("model" axis, Megatron sharding) alone, and tensor x data
parallel ("data" axis splitting the batch). One decode step (one new token
per sequence against a 2k KV cache), shapes only; every time is modeled.
"""

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import programs  # noqa: E402

import mtia_jax  # noqa: E402

CHIP = "mtia450"
CACHE = 2048
PER_REPLICA_BATCH = 8


def step(config, data: int, model: int):
    batch = PER_REPLICA_BATCH * data
    mesh = mtia_jax.make_mesh((data, model), ("data", "model"), chip=CHIP)
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    return batch, mtia_jax.estimate(fn, *programs.llama_shapes(config, batch, CACHE), chip=CHIP, mesh=mesh,
                                    in_shardings=programs.llama_shardings(config, model))


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


if __name__ == "__main__":
    main()
