"""What if the chip had more HBM bandwidth, or more MX4 FLOPs?

    python examples/what_if.py [--chip mtia450] [--out docs/what_if.png]

Sweeps two numbers of a catalogue chip around their published values, with
``ChipSpec.replace`` (no code change in the compiler or the catalogue), and
models one decode step of a Llama-3-70B-shaped model (``models.transformer``
preset ``llama3-70b``, MX4 weights and MX8 activations, KV cache of 2048
positions) for a small and a large decode batch. Every figure is *modeled*
by ``mtia_jax.estimate`` from shapes only: nothing the size of 70B is
allocated.

The picture is MTIA's design bet: at serving batch sizes a decode step reads
every weight once per step, so tokens/s follows HBM bandwidth almost
one for one, while extra matrix FLOPs buy little until the batch is large.
With MX8 activations the matrix rate that binds is the MX8 one, so the
sweep scales all MX rates together.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import numpy as np

import mtia_jax
from models import transformer

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
BATCHES = (8, 128)
CACHE = 2048
POLICY = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")


def sweep_variants(chip: mtia_jax.chips.ChipSpec, scale: float) -> dict[str, mtia_jax.chips.ChipSpec]:
    """The chip with its HBM bandwidth, or its MX matrix rates, times ``scale``.

    Every MX rate (MX4, MX6, MX8) is scaled together: with MX8 activations a
    mixed MX4 x MX8 matmul runs at the slower operand's rate, so scaling the
    MX4 rate alone would change nothing."""
    return {
        "HBM bandwidth": chip.replace(hbm_bandwidth=chip.hbm_bandwidth * scale),
        "MX FLOP/s": chip.replace(peak_flops={**chip.peak_flops,
                                               **{c: r * scale for c, r in chip.peak_flops.items()
                                                  if c.startswith("mx")}}),
    }


def decode_tokens_per_s(cfg, chip, batch: int) -> float:
    """Modeled tokens/s of one decode step of ``batch`` sequences on ``chip``."""
    step = functools.partial(transformer.decode, cfg)
    tokens = jax.ShapeDtypeStruct((batch,), np.int32)
    report = mtia_jax.estimate(step, transformer.param_shapes(cfg), tokens,
                               transformer.cache_shapes(cfg, batch, CACHE), chip=chip, precision=POLICY,
                               donate_argnums=(2,))  # the KV cache is written in place
    return batch / report.time_s


def sweep(chip_name: str) -> dict[tuple[str, int], list[float]]:
    """(swept quantity, batch) -> modeled tokens/s at each of ``SCALES``."""
    cfg = transformer.Config.preset("llama3-70b")
    chip = mtia_jax.chips.get(chip_name)
    results: dict[tuple[str, int], list[float]] = {}
    for scale in SCALES:
        for what, variant in sweep_variants(chip, scale).items():
            for batch in BATCHES:
                results.setdefault((what, batch), []).append(decode_tokens_per_s(cfg, variant, batch))
    return results


def plot(results, chip_name: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 4), sharex=True)
    for ax, batch in zip(np.atleast_1d(axes), BATCHES):
        for (what, b), values in results.items():
            if b == batch:
                ax.plot(SCALES, values, marker="o", label=f"{what} x scale")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xticks(SCALES, [f"{s:g}x" for s in SCALES])
        ax.set_xlabel(f"scale of the {chip_name} value")
        ax.set_ylabel("modeled decode tokens/s")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Llama-3-70B decode (MX4 weights, KV {CACHE}) on one {chip_name}: modeled")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default="mtia450")
    parser.add_argument("--out", type=Path, default=Path("docs/what_if.png"))
    args = parser.parse_args(argv)
    results = sweep(args.chip)
    print(f"Llama-3-70B decode, MX4 weights, KV cache {CACHE}, one {args.chip} (modeled tokens/s)")
    print(f"{'swept':<15} {'batch':>5} " + " ".join(f"{f'{s:g}x':>9}" for s in SCALES))
    for (what, batch), values in results.items():
        print(f"{what:<15} {batch:>5} " + " ".join(f"{v:>9.0f}" for v in values))
    plot(results, args.chip, args.out)
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
