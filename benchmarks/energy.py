"""Modeled energy per token (runtime/power.py) of Llama-3-70B decode and per
sample of the MLPerf DCNv2 recommender, across chips.

    python benchmarks/energy.py [--chip-hour-cost USD]

Llama-3-70B: one decode step of 64 sequences against a 2k KV cache, 8-way
tensor parallel, bf16 (and MX4 weights / MX8 activations where the chip has
MX); DCNv2: 8 chips, 2048 samples each. Shapes only. Every figure is
modeled: time by the cost model, energy by the power model, whose three
constants are assumptions; the last columns give the energy per token with
each moved (idle 15 % / 45 % of TDP, compute share 40 % / 80 % of the
dynamic power). ``--chip-hour-cost`` (the price of one chip for one hour,
which this project does not invent) adds the cost per million tokens.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mtia_jax  # noqa: E402
from models import dlrm  # noqa: E402
from models import transformer as tf  # noqa: E402
from runtime import power  # noqa: E402

CHIPS = ("mtia400", "mtia450", "mtia500", "h100", "h200")
BATCH, CACHE, TP = 64, 2048, 8
MX4 = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")


def llama_decode(chip: str, precision=None):
    cfg = tf.Config.preset("llama3-70b")
    mesh = tf.tensor_parallel_mesh(cfg, 1, TP, chip=chip)
    pspecs, cspecs, tspec = tf.shardings(cfg, mesh, BATCH)
    return mtia_jax.estimate(functools.partial(tf.decode, cfg), tf.param_shapes(cfg),
                             jax.ShapeDtypeStruct((BATCH,), jnp.int32), tf.cache_shapes(cfg, BATCH, CACHE),
                             chip=chip, mesh=mesh, in_shardings=(pspecs, tspec, cspecs), donate_argnums=(2,),
                             precision=precision)


def dcnv2(chip: str):
    mesh = mtia_jax.make_mesh((8,), ("model",), chip=chip)
    return dlrm.estimate(dlrm.Config.preset("mlperf-dcnv2"), 8 * 2048, chip=chip, mesh=mesh)


def row(name: str, chip: str, report, items: int, devices: int, what: str, hour_cost) -> str:
    e = report.energy()
    per_item = e.joules * devices / items
    moved = [report.energy(idle_fraction=f).joules * devices / items for f in (0.15, 0.45)]
    moved += [report.energy(compute_share=c).joules * devices / items for c in (0.4, 0.8)]
    rate = items / report.time_s
    cost = (f" {hour_cost * devices / 3600 / rate * 1e6:>10.4f}" if hour_cost else "")
    return (f"{name:<26} {chip:<8} {report.time_s * 1e3:>8.3f} {rate / devices:>11.4g} {e.watts:>7.0f} "
            f"{per_item:>10.4g} {1 / per_item:>10.4g} {what:<7} "
            + " ".join(f"{m / per_item - 1:>+6.0%}" for m in moved) + cost)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip-hour-cost", type=float, default=None,
                        help="price of one chip for one hour (USD); adds cost per million items")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cost_head = f" {'$/M items':>10}" if args.chip_hour_cost else ""
    print("Modeled energy (runtime/power.py: idle 30 % of TDP, dynamic 60 % compute / 40 % HBM; "
          "assumptions); per device figures, items = tokens or samples")
    print(f"{'workload':<26} {'chip':<8} {'step ms':>8} {'items/s/dev':>11} {'W/dev':>7} "
          f"{'J/item':>10} {'items/J':>10} {'item':<7} idle15 idle45 comp40 comp80{cost_head}")
    for chip in CHIPS:
        spec = mtia_jax.chips.get(chip)
        print(row("70B decode B64 bf16", chip, llama_decode(chip), BATCH, TP, "token", args.chip_hour_cost))
        if "mx_matmul" in spec.units and "mx4" in spec.peak_flops:
            print(row("70B decode B64 MX4", chip, llama_decode(chip, MX4), BATCH, TP, "token",
                      args.chip_hour_cost))
    for chip in CHIPS:
        print(row("DCNv2 8 chips x 2048", chip, dcnv2(chip), 8 * 2048, 8, "sample", args.chip_hour_cost))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
