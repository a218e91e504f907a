"""Serving latency and goodput against request rate, on the modeled clock
(``models.serving_sim``: vLLM-style scheduling over a paged KV cache, step
times from shapes), as vLLM's ``benchmark_serving`` reports them.

    python benchmarks/serving_sweep.py --preset llama3-70b --chip mtia450 --mesh 1x8 --dtype mx4

For each request rate: Poisson arrivals (seeded), prompts uniform in
``--prompt`` and outputs in ``--output`` tokens; prints throughput, goodput
under the SLO (TTFT <= 500 ms, TPOT <= 50 ms by default) and TTFT / TPOT /
ITL / end-to-end percentiles, and writes a plot (``--plot``). Every time is
modeled, not measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mtia_jax  # noqa: E402
from models import load, transformer as tf  # noqa: E402
from models.paged_kv import concurrent_sequences  # noqa: E402
from models.serving_sim import ServingSimulator  # noqa: E402

POLICIES = {"bf16": None, "mx8": dict(weights="mx8", activations="mx8"),
            "mx4": dict(weights="mx4", activations="mx8")}


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def sweep(preset: str, chip: str, mesh: str, dtype: str, rates, requests: int, prompt, output, slo, seed: int,
          progress: bool = True):
    cfg = tf.Config.preset(preset)
    data, model = (int(x) for x in mesh.lower().split("x"))
    policy = POLICIES[dtype]
    sim = ServingSimulator(cfg, chip=chip, mesh=tf.tensor_parallel_mesh(cfg, data, model, chip=chip),
                           precision=mtia_jax.PrecisionPolicy(**policy) if policy else None, slo=slo)
    rows = []
    for rate in rates:
        reqs = load.poisson(rate, requests, load.Uniform(*prompt), load.Uniform(*output), seed=seed)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=requests, desc=f"{chip} {dtype} {rate:g} req/s", leave=False, file=sys.stderr)
        result = sim.run(reqs, progress=bar)
        if bar is not None:
            bar.close()
        rows.append((rate, result))
    return sim, rows


def table(title: str, rows) -> str:
    head = (f"{'req/s':>6} {'tok/s':>8} {'goodput':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
            f"{'TPOT p99':>9} {'ITL p99':>8} {'E2E p99':>8} {'preempt':>7} {'max seqs':>8}")
    lines = [title, head + "   (ms; goodput in requests/s meeting the SLO)"]
    for rate, r in rows:
        m = r.metrics
        lines.append(f"{rate:>6g} {m.throughput:>8.0f} {m.goodput:>8.2f} {m.ttft.p50 * 1e3:>9.1f} "
                     f"{m.ttft.p99 * 1e3:>9.1f} {m.tpot.p50 * 1e3:>9.2f} {m.tpot.p99 * 1e3:>9.2f} "
                     f"{m.itl.p99 * 1e3:>8.2f} {m.e2e.p99 * 1e3:>8.0f} {r.preemptions:>7} {r.max_running:>8}")
    return "\n".join(lines)


def plot(path: Path, runs: dict, slo) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, rows in runs.items():
        rates = [rate for rate, _ in rows]
        axes[0].plot(rates, [r.metrics.goodput for _, r in rows], "o-", label=label)
        axes[1].plot(rates, [r.metrics.ttft.p99 * 1e3 for _, r in rows], "o-", label=f"{label} p99")
        axes[1].plot(rates, [r.metrics.ttft.p50 * 1e3 for _, r in rows], "x--", label=f"{label} p50")
        axes[2].plot(rates, [r.metrics.tpot.p99 * 1e3 for _, r in rows], "o-", label=f"{label} p99")
        axes[2].plot(rates, [r.metrics.tpot.p50 * 1e3 for _, r in rows], "x--", label=f"{label} p50")
    axes[1].axhline(slo.ttft_s * 1e3, color="grey", lw=0.8)
    axes[2].axhline(slo.tpot_s * 1e3, color="grey", lw=0.8)
    for ax, title in zip(axes, ("goodput (requests/s meeting the SLO)", "TTFT (ms)", "TPOT (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_title(title + ", modeled")
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3-70b")
    p.add_argument("--chip", default="mtia450", help="one chip, or several separated by commas")
    p.add_argument("--mesh", default="1x8", help="data x model, e.g. 1x8")
    p.add_argument("--dtype", default="mx4", help=f"one of {sorted(POLICIES)}, or several separated by commas")
    p.add_argument("--rates", default="1,4,16,32,64,128", help="requests/s, separated by commas")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--prompt", type=_pair, default=(128, 2048), help="low,high prompt tokens (uniform)")
    p.add_argument("--output", type=_pair, default=(64, 512), help="low,high output tokens (uniform)")
    p.add_argument("--ttft-ms", type=float, default=500.0)
    p.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=8192,
                   help="positions a fixed-slot cache reserves per sequence (the served context length)")
    p.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "serving_sweep.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for dtype in args.dtype.split(","):
        if dtype not in POLICIES:
            p.error(f"unknown --dtype {dtype!r}; choose from {sorted(POLICIES)}")
    start = time.perf_counter()
    slo = load.SLO(args.ttft_ms / 1e3, args.tpot_ms / 1e3)
    rates = [float(r) for r in args.rates.split(",")]
    runs = {}
    for chip in args.chip.split(","):
        for dtype in args.dtype.split(","):
            sim, rows = sweep(args.preset, chip, args.mesh, dtype, rates, args.requests, args.prompt,
                              args.output, slo, args.seed, progress=not args.no_progress)
            label = f"{chip} {dtype}"
            runs[label] = rows
            print(table(f"{args.preset} on {args.mesh} x {chip}, {dtype}; {args.requests} requests, prompts "
                        f"U{args.prompt}, outputs U{args.output}; SLO TTFT <= {args.ttft_ms:g} ms, TPOT <= "
                        f"{args.tpot_ms:g} ms; {sim.kv_blocks} KV blocks of {sim.block_size}; "
                        f"{sim.times.estimates} step shapes estimated (modeled)", rows))
            # how many sequences of this workload's lengths the pool holds at once, paged vs fixed slots
            sample = load.poisson(1.0, 100_000, load.Uniform(*args.prompt), load.Uniform(*args.output),
                                  seed=args.seed)
            positions = sim.kv_blocks * sim.block_size
            fixed, paged = concurrent_sequences([r.prompt_len + r.output_len for r in sample], positions,
                                                max_len=args.max_len, block_size=sim.block_size)
            print(f"KV pool of {positions:,} positions (HBM left after the weights) holds {paged:,} of "
                  f"this workload's sequences paged vs {fixed:,} in fixed slots of {args.max_len} "
                  f"positions ({paged / fixed:.1f}x)")
            print()
    if not args.no_plot:
        plot(args.plot, runs, slo)
        print(f"plot: {args.plot}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
