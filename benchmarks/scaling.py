"""Modeled scaling over mtia450 meshes: Llama-3-70B decode (tensor and data
parallel), Mixtral-8x7B decode (expert parallel), the MLPerf DCNv2
recommender (row- and table-wise embeddings, data-parallel MLPs), and
Llama-3-405B prefill pipelined over two racks.

    python benchmarks/scaling.py

Each row gives the modeled step time, the share of it the network stream is
busy (collectives overlap compute where the program allows, so shares are
not additive), and the algorithm each collective chose
(``lowering.network``), counted per step.

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
from models import dlrm  # noqa: E402
from models import transformer as tf  # noqa: E402

CHIP = "mtia450"
CACHE = 2048
PER_REPLICA_BATCH = 8
DLRM_PER_CHIP = 2048


def step(config, data: int, model: int):
    batch = PER_REPLICA_BATCH * data
    mesh = programs.llama_mesh(config, data, model, chip=CHIP)
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
          f"{'HBM GB/dev':>10} {'fits':>5} {'estimate s':>10}  collectives")
    tp_experts = {**tf.SHARDING_RULES, "experts": None}
    layouts = [(d, "ep", None) for d in (1, 2, 4, 8)] + [(1, "tp experts", tp_experts)]
    for data, name, rules in layouts:
        start = time.perf_counter()
        batch, r = mixtral_step(data, 8, rules)
        wall = time.perf_counter() - start
        print(f"{data * 8:>5} {f'{data} data x 8 {name}':<22} {batch:>5} {r.time_s * 1e3:>8.2f} "
              f"{batch / r.time_s:>9.0f} {r.collective_time_s / r.time_s:>12.1%} "
              f"{r.peak_hbm_bytes / 1e9:>10.1f} {str(r.fits):>5} {wall:>10.2f}  {algorithms(r)}")


def algorithms(report) -> str:
    """"count x kind:algorithm" per distinct collective of a step."""
    counts: dict[str, float] = {}
    for k in report.cost.kernels:
        if k.stream == "network" and k.algorithm != "local":  # "local": a group of one device
            name = f"{k.kind}:{k.algorithm}"
            counts[name] = counts.get(name, 0.0) + k.count
    return ", ".join(f"{n:g}x {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def dlrm_table():
    cfg = dlrm.Config.preset("mlperf-dcnv2")
    print(f"\nMLPerf DCNv2 inference, fp32, {DLRM_PER_CHIP} samples per chip, on {CHIP} (modeled)")
    print(f"{'chips':>5} {'batch':>6} {'step ms':>8} {'samples/s':>10} {'per chip':>9} {'collective %':>12} "
          f"{'HBM GB/dev':>10}  collectives")
    for chips in (1, 2, 4, 8, 16):
        mesh = None if chips == 1 else mtia_jax.make_mesh((chips,), ("model",), chip=CHIP)
        batch = DLRM_PER_CHIP * chips
        r = dlrm.estimate(cfg, batch, chip=CHIP, mesh=mesh)
        print(f"{chips:>5} {batch:>6} {r.time_s * 1e3:>8.3f} {batch / r.time_s:>10.3g} "
              f"{batch / r.time_s / chips:>9.3g} {r.collective_time_s / r.time_s:>12.1%} "
              f"{r.peak_hbm_bytes / 1e9:>10.1f}  {algorithms(r)}")


def pipeline_table():
    """Llama-3-405B prefill of 8 x 4096 tokens on 2 racks of 72: 18 stages of 7
    layers (9 per rack), each tensor parallel over 8 chips."""
    cfg = tf.Config.preset("llama3-405b")
    mesh = mtia_jax.make_mesh((2, 9, 8), ("pod", "stage", "model"), chip=CHIP, scale_out_axes=("pod",))
    print(f"\nLlama-3-405B prefill, bf16, 8 sequences x 4096 tokens, 2 racks x 9 stages x 8-way tensor "
          f"parallel on {CHIP} (modeled)")
    print(f"{'micro':>5} {'step ms':>8} {'stage ms':>8} {'bubble %':>8} {'(S-1)/(M+S-1)':>13} "
          f"{'scale-out ms':>12} {'scale-out GB':>12} {'tokens/s':>9} {'estimate s':>10}")
    for micro in (1, 2, 4, 8):
        start = time.perf_counter()
        stages = tf.pipeline_stages(cfg, 18, 8 // micro, 4096, mtia_jax.make_mesh((8,), ("model",), chip=CHIP))
        r = mtia_jax.estimate_pipeline(stages, mesh=mesh,
                                       axis=("pod", "stage"), microbatches=micro, chip=CHIP)
        wall = time.perf_counter() - start
        print(f"{micro:>5} {r.time_s * 1e3:>8.1f} {max(r.stage_time_s) * 1e3:>8.2f} {r.bubble_fraction:>8.1%} "
              f"{17 / (micro + 17):>13.1%} {r.scale_out_s * 1e3:>12.2f} {r.scale_out_bytes / 1e9:>12.3f} "
              f"{8 * 4096 / r.time_s:>9.0f} {wall:>10.2f}")
    print(r.table())


def main():
    config = programs.LLAMA_CONFIGS["llama3-70b"]
    print(f"Llama-3-70B decode, bf16, KV cache {CACHE}, {PER_REPLICA_BATCH} sequences per data replica, "
          f"on {CHIP} (modeled)")
    print(f"{'chips':>5} {'layout':<14} {'batch':>5} {'step ms':>8} {'tokens/s':>9} {'collective %':>12} "
          f"{'HBM GB/dev':>10} {'fits':>5} {'estimate s':>10}  collectives")
    layouts = [(1, m) for m in (1, 2, 4, 8, 16, 32, 64)] + [(d, 8) for d in (2, 4, 8, 9)]
    for data, model in layouts:
        start = time.perf_counter()
        batch, r = step(config, data, model)
        wall = time.perf_counter() - start
        print(f"{data * model:>5} {f'{data} data x {model} tp':<14} {batch:>5} {r.time_s * 1e3:>8.2f} "
              f"{batch / r.time_s:>9.0f} {r.collective_time_s / r.time_s:>12.1%} "
              f"{r.peak_hbm_bytes / 1e9:>10.1f} {str(r.fits):>5} {wall:>10.2f}  {algorithms(r)}")
    mixtral_table()
    dlrm_table()
    pipeline_table()


if __name__ == "__main__":
    main()
