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


# the power model's assumptions, each moved (runtime/power.py: idle 30 % of
# TDP, 60 % of the dynamic power to compute); the keys are the column heads
SENSITIVITY = {"idle15": dict(idle_fraction=0.15), "idle45": dict(idle_fraction=0.45),
               "comp40": dict(compute_share=0.4), "comp80": dict(compute_share=0.8)}


def has_mx4(chip: str) -> bool:
    """Whether ``chip`` runs MX4 matmuls (the MTIA chips; not the GPUs)."""
    spec = mtia_jax.chips.get(chip)
    return "mx_matmul" in spec.units and "mx4" in spec.peak_flops


def runs(chips=CHIPS):
    """Every workload of the table, in its order: ``(workload, chip, report,
    items per step, devices, item)``, items being tokens or samples."""
    for chip in chips:
        yield "70B decode B64 bf16", chip, llama_decode(chip), BATCH, TP, "token"
        if has_mx4(chip):
            yield "70B decode B64 MX4", chip, llama_decode(chip, MX4), BATCH, TP, "token"
    for chip in chips:
        yield "DCNv2 8 chips x 2048", chip, dcnv2(chip), 8 * 2048, 8, "sample"


def figures(report, items: int, devices: int) -> dict:
    """The modeled figures of one step of ``items`` tokens or samples on
    ``devices`` chips: step seconds, items/s per device, average watts per
    device, joules per item (all devices' energy) and items per joule, and
    ``moved``: joules per item with each assumption of ``SENSITIVITY`` moved."""
    e = report.energy()
    per_item = e.joules * devices / items
    return {"step_s": report.time_s, "items_per_s_per_device": items / report.time_s / devices,
            "watts_per_device": e.watts, "joules_per_item": per_item, "items_per_joule": 1 / per_item,
            "moved": {name: report.energy(**moved).joules * devices / items
                      for name, moved in SENSITIVITY.items()}}


def row(name: str, chip: str, report, items: int, devices: int, what: str, hour_cost) -> str:
    f = figures(report, items, devices)
    per_item = f["joules_per_item"]
    cost = (f" {hour_cost / 3600 / f['items_per_s_per_device'] * 1e6:>10.4f}" if hour_cost else "")
    return (f"{name:<26} {chip:<8} {f['step_s'] * 1e3:>8.3f} {f['items_per_s_per_device']:>11.4g} "
            f"{f['watts_per_device']:>7.0f} {per_item:>10.4g} {f['items_per_joule']:>10.4g} {what:<7} "
            + " ".join(f"{m / per_item - 1:>+6.0%}" for m in f["moved"].values()) + cost)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip-hour-cost", type=float, default=None,
                        help="price of one chip for one hour (USD); adds cost per million items")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cost_head = f" {'$/M items':>10}" if args.chip_hour_cost else ""
    print(f"Modeled energy (runtime/power.py: idle {power.IDLE_FRACTION:.0%} of TDP, dynamic "
          f"{power.COMPUTE_SHARE:.0%} compute / {power.HBM_SHARE:.0%} HBM; assumptions); per device figures, "
          f"items = tokens or samples")
    print(f"{'workload':<26} {'chip':<8} {'step ms':>8} {'items/s/dev':>11} {'W/dev':>7} "
          f"{'J/item':>10} {'items/J':>10} {'item':<7} " + " ".join(f"{k:>6}" for k in SENSITIVITY) + cost_head)
    for name, chip, report, items, devices, what in runs():
        print(row(name, chip, report, items, devices, what, args.chip_hour_cost))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
