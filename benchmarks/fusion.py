"""What fusion buys: the jnp transformer block's modeled time and HBM bytes
with no fusion, with prologue fusion only (cheap producers recomputed in
their consumers), and with both the fusion pass (groups and epilogues) and
prologue fusion, on every MTIA chip (modeled, not measured).

    python benchmarks/fusion.py
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import programs  # noqa: E402

import mtia_jax  # noqa: E402
from lowering.passes import fusion, prologue  # noqa: E402
from lowering.pipeline import PASSES, PassContext, run_passes  # noqa: E402
from runtime.cost_model import program_cost  # noqa: E402


def main(batch=8, seq=1024, d=1024):
    shapes = jax.eval_shape(lambda: programs.make_transformer(
        jax.random.PRNGKey(0), layers=1, d=d, batch=batch, seq=seq, dtype=jnp.bfloat16))
    lowered = mtia_jax.jit(programs.transformer).lower(*shapes)
    configurations = {
        "none": tuple(p for p in PASSES if p not in (fusion, prologue)),
        "prologue": tuple(p for p in PASSES if p is not fusion),
        "both": PASSES,
    }
    print(f"transformer block, batch {batch}, seq {seq}, d_model {d}, bf16 (modeled)")
    print(f"{'chip':<9} {'fusion':<8} {'kernels':>7} {'HBM MB':>9} {'modeled us':>11} "
          f"{'roofline us':>12} {'efficiency':>10}")
    for chip_name in ("mtia300", "mtia400", "mtia450", "mtia500"):
        chip = mtia_jax.chips.get(chip_name)
        results = {}
        for label, passes in configurations.items():
            module = run_passes(lowered.module, PassContext(chip=chip), passes)
            cost = program_cost(module, chip)
            results[label] = cost
            print(f"{chip_name:<9} {label:<8} {len(cost.kernels):>7} {cost.total('hbm_bytes') / 1e6:>9.1f} "
                  f"{cost.time_s * 1e6:>11.1f} {cost.roofline_time_s * 1e6:>12.1f} "
                  f"{cost.roofline_time_s / cost.time_s:>10.2f}")
        cut = 1 - results["both"].total("hbm_bytes") / results["none"].total("hbm_bytes")
        speedup = results["none"].time_s / results["both"].time_s
        print(f"{'':<9} fusion cuts HBM bytes by {cut:.0%}, modeled time by {speedup:.2f}x")


if __name__ == "__main__":
    main()
