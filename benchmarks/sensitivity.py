"""How much each headline number moves when each model constant moves by 50 %.

    python benchmarks/sensitivity.py              # the table
    python benchmarks/sensitivity.py --markdown   # also write it into docs/model.md

Headlines (modeled on MTIA 450, shapes only): Llama-3-70B decode at batch 1
in bf16 and under MX4 weights / MX8 activations, and at batch 64 in MX4; an
8192^3 bf16 GEMM; a Llama-3-8B prefill of 2048 tokens; the MLPerf
DLRM-DCNv2 forward of 4096 pairs; a tensor-parallel Llama-3-70B decode step
on 8 chips. Constants: the catalogue fields the cost model reads that are
assumptions (``mtia_jax.chips`` sources say which) and the module
constants of the cost rules. Each is scaled by 0.5 and 1.5 (fractions are
capped at 1; a constant already at 1 is only lowered: "n/a"). A cell is the
headline's relative change at x0.5 / x1.5; "0" means less than 0.5 %, and a
row of zeros is left blank.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import programs  # noqa: E402

import mtia_jax  # noqa: E402
from lowering.passes import tiling  # noqa: E402
from models import dlrm  # noqa: E402
from models import transformer as tf  # noqa: E402
from mtia_jax import chips  # noqa: E402
from runtime import cost_model, work  # noqa: E402

S = jax.ShapeDtypeStruct
BASE = chips.get("mtia450")
MX4 = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")
DOC = Path(__file__).resolve().parent.parent / "docs" / "model.md"
MARKDOWN_BEGIN = "<!-- benchmarks/sensitivity.py --markdown: begin -->"
MARKDOWN_END = "<!-- benchmarks/sensitivity.py --markdown: end -->"


def _structs(tree):
    return jax.tree.map(lambda s: S(s.shape, s.dtype), tree)


def _decode(chip, preset: str, batch: int, precision=None):
    cfg = tf.Config.preset(preset)
    return mtia_jax.estimate(functools.partial(tf.decode, cfg), _structs(tf.param_shapes(cfg)),
                             S((batch,), jnp.int32), tf.cache_shapes(cfg, batch, 4096), chip=chip,
                             precision=precision, donate_argnums=(2,)).time_s


def _prefill(chip):
    cfg = tf.Config.preset("llama3-8b")
    return mtia_jax.estimate(functools.partial(tf.prefill, cfg), _structs(tf.param_shapes(cfg)),
                             S((1, 2048), jnp.int32), S((1,), jnp.int32), tf.cache_shapes(cfg, 1, 2048),
                             chip=chip, donate_argnums=(3,)).time_s


def _tp(chip, chips: int):
    config = programs.LLAMA_CONFIGS["llama3-70b"]
    mesh = programs.llama_mesh(config, 1, chips, chip=chip)
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    return mtia_jax.estimate(fn, *programs.llama_shapes(config, 8, 4096), chip=chip, mesh=mesh,
                             in_shardings=programs.llama_shardings(config, chips),
                             donate_argnums=(1, 2)).time_s


def _dcnv2_8(chip):
    mesh = mtia_jax.make_mesh((8,), ("model",), chip=chip)
    return dlrm.estimate(dlrm.Config.preset("mlperf-dcnv2"), 8 * 2048, chip=chip, mesh=mesh).time_s


def _pipeline_405b(chip):
    cfg = tf.Config.preset("llama3-405b")
    mesh = mtia_jax.make_mesh((2, 9, 8), ("pod", "stage", "model"), chip=chip, scale_out_axes=("pod",))
    stages = tf.pipeline_stages(cfg, 18, 1, 4096, mtia_jax.make_mesh((8,), ("model",), chip=chip))
    return mtia_jax.estimate_pipeline(stages, mesh=mesh,
                                      axis=("pod", "stage"), microbatches=8, chip=chip).time_s


HEADLINES = {
    "70B decode B1 bf16": lambda c: _decode(c, "llama3-70b", 1),
    "70B decode B1 MX4": lambda c: _decode(c, "llama3-70b", 1, MX4),
    "70B decode B64 MX4": lambda c: _decode(c, "llama3-70b", 64, MX4),
    "GEMM 8192^3 bf16": lambda c: mtia_jax.estimate(jnp.matmul, *[S((8192, 8192), jnp.bfloat16)] * 2,
                                                    chip=c).time_s,
    "8B prefill 2048": _prefill,
    "DCNv2 4096 pairs": lambda c: dlrm.estimate(dlrm.Config.preset("mlperf-dcnv2"), 4096, chip=c).time_s,
    "70B decode B8 TP8": lambda c: _tp(c, 8),
    "70B decode B8 TP64": lambda c: _tp(c, 64),
    "DCNv2 8 chips x 2048": _dcnv2_8,
    "405B prefill 2 racks PP": _pipeline_405b,
}


def _scaled_chip(field: str):
    @contextlib.contextmanager
    def scaled(factor: float):
        value = getattr(BASE, field)
        new = value * factor
        if field in chips.FRACTION_FIELDS:
            new = min(new, 1.0)
        if field in ("pe_local_bytes", "sram_bytes", "scaleup_links"):
            new = max(int(round(new)), 1)
        yield BASE.replace(**{field: new})
    return scaled


def _scaled_vector(factor: float):
    return contextlib.nullcontext(BASE.replace(vector_flops={k: v * factor for k, v in BASE.vector_flops.items()}))


def _scaled_module(module_attrs: tuple[tuple[object, str], ...], integer: bool = True):
    @contextlib.contextmanager
    def scaled(factor: float):
        saved = [getattr(m, a) for m, a in module_attrs]
        try:
            for (m, a), v in zip(module_attrs, saved):
                setattr(m, a, int(round(v * factor)) if integer else v * factor)
            tiling.choose_gemm_tile.cache_clear()
            yield BASE
        finally:
            for (m, a), v in zip(module_attrs, saved):
                setattr(m, a, v)
            tiling.choose_gemm_tile.cache_clear()
    return scaled


# constant -> (what it is, context manager giving the chip to model with)
CONSTANTS = {
    "kernel_launch_s": ("launch time per kernel (2i's < 1 us bound)", _scaled_chip("kernel_launch_s")),
    "hbm_efficiency": ("achievable HBM fraction (held at 1)", _scaled_chip("hbm_efficiency")),
    "matmul_efficiency": ("achievable matrix-engine fraction (1)", _scaled_chip("matmul_efficiency")),
    "hbm_random_access_efficiency": ("one-granule random reads vs streaming", _scaled_chip("hbm_random_access_efficiency")),
    "vector_flops": ("vector/SFU rates (scaled from 2i)", _scaled_vector),
    "sram_bytes": ("on-chip SRAM (tile K depth)", _scaled_chip("sram_bytes")),
    "pe_local_bytes": ("PE local memory (tile, q block)", _scaled_chip("pe_local_bytes")),
    "clock_hz": ("clock (DPE cycles per FLOP)", _scaled_chip("clock_hz")),
    "scaleup_link_latency_s": ("flight time of a scale-up message (1 us)", _scaled_chip("scaleup_link_latency_s")),
    "scaleup_message_s": ("issue time per message (0.1 us)", _scaled_chip("scaleup_message_s")),
    "scaleup_links": ("messages in flight per device (12 links)", _scaled_chip("scaleup_links")),
    "scaleout_latency_s": ("per-message latency between racks (5 us)", _scaled_chip("scaleout_latency_s")),
    "collective_efficiency": ("achievable link fraction (1)", _scaled_chip("collective_efficiency")),
    "DPE_FILL_DRAIN_CYCLES": ("DPE fill + drain per native block (64)", _scaled_module(((tiling, "DPE_FILL_DRAIN_CYCLES"),))),
    "ACCESS_GRANULE_BYTES": ("DRAM access granule (64 B)", _scaled_module(((work, "ACCESS_GRANULE_BYTES"), (cost_model, "ACCESS_GRANULE_BYTES")))),
}


def table() -> tuple[dict, dict]:
    """(base value per headline, {constant: {headline: (change at 0.5, change at 1.5)}})."""
    base = {name: fn(BASE) for name, fn in HEADLINES.items()}
    moves = {}
    for constant, (_, scaled) in CONSTANTS.items():
        moves[constant] = {}
        for name, fn in HEADLINES.items():
            changes = []
            for factor in (0.5, 1.5):
                with scaled(factor) as chip:
                    if factor > 1 and constant in chips.FRACTION_FIELDS and getattr(BASE, constant) >= 1:
                        changes.append(None)
                        continue
                    changes.append(fn(chip) / base[name] - 1)
            moves[constant][name] = tuple(changes)
    return base, moves


def _cell(changes) -> str:
    """``x0.5 / x1.5`` changes of one headline; blank when neither moves."""
    texts = ["n/a" if c is None else "0" if abs(c) < 0.005 else f"{c:+.0%}" for c in changes]
    return "" if all(t in ("0", "n/a") for t in texts) else " / ".join(texts)


def render(base: dict, moves: dict, markdown: bool) -> str:
    names = list(HEADLINES)
    if markdown:
        lines = ["| constant (x0.5 / x1.5) | " + " | ".join(names) + " |",
                 "|---|" + "---:|" * len(names),
                 "| **modeled base** | " + " | ".join(f"{base[n] * 1e3:.4g} ms" for n in names) + " |"]
        for constant, (what, _) in CONSTANTS.items():
            cells = [_cell(moves[constant][n]) for n in names]
            lines.append(f"| `{constant}`: {what} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    width = max(len(c) for c in CONSTANTS) + 2
    lines = [f"{'':<{width}}" + "".join(f"{n:>22}" for n in names),
             f"{'base (modeled)':<{width}}" + "".join(f"{base[n] * 1e3:>19.4g} ms" for n in names)]
    for constant in CONSTANTS:
        cells = [_cell(moves[constant][n]) for n in names]
        lines.append(f"{constant:<{width}}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help=f"write the table into {DOC.name}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base, moves = table()
    print(f"Relative change of each modeled headline on {BASE.name} when a constant is scaled "
          f"by 0.5 / 1.5 (0: < 0.5 %; blank: neither moves)")
    print(render(base, moves, markdown=False))
    if args.markdown:
        doc = DOC.read_text()
        begin, end = doc.index(MARKDOWN_BEGIN) + len(MARKDOWN_BEGIN), doc.index(MARKDOWN_END)
        DOC.write_text(doc[:begin] + "\n" + render(base, moves, markdown=True) + "\n" + doc[end:])
        print(f"wrote the table into {DOC}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
