"""Pinned modeled times of canonical kernels on every MTIA chip.

A change of the cost model, a pass or a catalogue number that moves any of
these times fails this test with a table of what moved, so the change is a
visible, deliberate diff: after checking that the move is intended, rewrite
the pins with

    python tests/test_cost_pins.py --update

and commit ``tests/cost_pins.json`` with the change that moved them.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import mtia_jax

PINS = Path(__file__).with_name("cost_pins.json")
CHIPS = ("mtia300", "mtia400", "mtia450", "mtia500")
REL_TOL = 1e-3  # deterministic model: only float noise is tolerated

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
MX4_WEIGHTS = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")


def _mlp_tp(x, w1, w2):
    return jax.nn.gelu(x @ w1) @ w2


# name -> (function, argument shapes, estimate options); times are per device
KERNELS = {
    "gemm 4096^3 bf16 (compute bound)": (jnp.matmul, (S((4096, 4096), BF16), S((4096, 4096), BF16)), {}),
    "decode gemv 8x8192x8192 bf16": (jnp.matmul, (S((8, 8192), BF16), S((8192, 8192), BF16)), {}),
    "decode gemv 8x8192x8192 mx4": (jnp.matmul, (S((8, 8192), BF16), S((8192, 8192), BF16)),
                                    {"precision": MX4_WEIGHTS}),
    "flash attention prefill 2k x 32 heads": (
        functools.partial(mtia_jax.flash_attention, is_causal=True),
        (S((1, 2048, 32, 128), BF16), S((1, 2048, 8, 128), BF16), S((1, 2048, 8, 128), BF16)), {}),
    "rms_norm 4096x8192 bf16": (mtia_jax.rms_norm, (S((4096, 8192), BF16), S((8192,), BF16)), {}),
    "embedding_bag 1M x 128, 2048 bags of 32": (
        mtia_jax.embedding_bag, (S((1_000_000, 128), jnp.float32), S((2048, 32), jnp.int32)), {}),
    "moe_ffn 64 tokens, 8 experts top-2": (
        functools.partial(mtia_jax.moe_ffn, top_k=2),
        (S((64, 4096), BF16), S((64, 8), jnp.float32), S((8, 4096, 14336), BF16),
         S((8, 4096, 14336), BF16), S((8, 14336, 4096), BF16)), {}),
    "megatron mlp tp8 (one all-reduce)": (
        _mlp_tp, (S((64, 8192), BF16), S((8192, 28672), BF16), S((28672, 8192), BF16)),
        {"mesh": ("model", 8), "in_shardings": (P(), P(None, "model"), P("model", None))}),
}


def measure(name: str, chip: str) -> dict[str, float]:
    """Modeled time and collective time of kernel ``name`` on ``chip``."""
    fn, args, options = KERNELS[name]
    options = dict(options)
    if "mesh" in options:
        axis, size = options["mesh"]
        options["mesh"] = mtia_jax.make_mesh((size,), (axis,), chip=chip)
    report = mtia_jax.estimate(fn, *args, chip=chip, **options)
    return {"time_s": report.time_s, "collective_time_s": report.collective_time_s}


def current() -> dict:
    return {name: {chip: measure(name, chip) for chip in CHIPS} for name in KERNELS}


def test_modeled_times_match_the_pins():
    pinned = json.loads(PINS.read_text())
    assert set(pinned) == set(KERNELS), "kernels were added or removed: rewrite the pins (--update)"
    moved = []
    for name, by_chip in current().items():
        for chip, values in by_chip.items():
            for key, value in values.items():
                want = pinned[name][chip][key]
                if abs(value - want) > REL_TOL * max(abs(want), 1e-15):
                    moved.append(f"{name:<42} {chip:<8} {key:<17} pinned {want * 1e6:12.4f} us"
                                 f"  now {value * 1e6:12.4f} us  ({value / want - 1 if want else float('inf'):+.2%})")
    assert not moved, ("modeled times moved; if intended, run `python tests/test_cost_pins.py --update`:\n"
                       + "\n".join(moved))


def test_pins_keep_the_generations_in_order():
    """Independent of the pinned values: every memory-bound kernel gets faster
    from mtia300 to mtia500 (each generation adds HBM bandwidth)."""
    pinned = json.loads(PINS.read_text())
    for name in ("decode gemv 8x8192x8192 bf16", "rms_norm 4096x8192 bf16"):
        times = [pinned[name][chip]["time_s"] for chip in CHIPS]
        assert times == sorted(times, reverse=True), (name, times)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    PINS.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINS}")
