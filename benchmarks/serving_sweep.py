"""Serving latency and goodput against request rate, on the modeled clock
(``models.serving_sim``: vLLM-style scheduling over a paged KV cache, step
times from shapes), as vLLM's ``benchmark_serving`` reports them.

    python benchmarks/serving_sweep.py --preset llama3-70b --chip mtia450 --mesh 1x8 --dtype mx4
    python benchmarks/serving_sweep.py --preset llama3-70b --trace requests.jsonl [--rates 4,16]

For each request rate: Poisson arrivals (seeded), prompts uniform in
``--prompt`` and outputs in ``--output`` tokens; prints throughput, goodput
under the SLO (TTFT <= 500 ms, TPOT <= 50 ms by default) and TTFT / TPOT /
ITL / end-to-end percentiles and the energy per token (every device, from
the first arrival to the last token, idle power between requests included:
``runtime.power``), and writes a plot (``--plot``). Every time and every
joule is modeled, not measured.

With ``--trace FILE.jsonl`` (one ``{"arrival_s", "prompt_len",
"output_len"}`` object per line, ``models.load.read_trace``) the requests
are the trace's, with its lengths. Without ``--rates`` the sweep is one run
at the trace's own timing; its rate column is the trace's own rate,
requests / (last arrival - first arrival). With ``--rates`` each rate R is a
run of the same requests with their arrival times stretched or compressed,
``t -> (t - t_first) x own rate / R`` (the first request at 0): the order,
the lengths and the relative gaps stay, and requests / span becomes R.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
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


def trace_rate(requests) -> float:
    """A trace's own request rate: requests / (last arrival - first arrival);
    infinite when every request arrives at once."""
    span = requests[-1].arrival_s - requests[0].arrival_s
    return len(requests) / span if span > 0 else float("inf")


def scaled(requests, rate: float):
    """``requests`` (sorted by arrival) scaled to ``rate`` requests/s:
    arrivals ``t -> (t - t_first) x trace_rate / rate``, the first at 0."""
    own, first = trace_rate(requests), requests[0].arrival_s
    if own == float("inf"):
        raise ValueError("a trace whose requests all arrive at once has no rate to scale")
    return [dataclasses.replace(r, arrival_s=(r.arrival_s - first) * own / rate) for r in requests]


def poisson_loads(rates, requests: int, prompt, output, seed: int):
    """(rate, requests) per rate: Poisson arrivals, uniform lengths, seeded."""
    return [(rate, load.poisson(rate, requests, load.Uniform(*prompt), load.Uniform(*output), seed=seed))
            for rate in rates]


def trace_loads(requests, rates=None):
    """(rate, requests) per run of a trace: one at its own timing without
    ``rates``, else one per rate with the arrivals scaled (``scaled``)."""
    if rates is None:
        return [(trace_rate(requests), requests)]
    return [(rate, scaled(requests, rate)) for rate in rates]


def sweep(preset: str, chip: str, mesh: str, dtype: str, loads, slo, progress: bool = True,
          prefix_caching: bool = True):
    """Simulate each ``(rate, requests)`` of ``loads``: the simulator and the
    ``(rate, SimResult)`` rows."""
    cfg = tf.Config.preset(preset)
    data, model = (int(x) for x in mesh.lower().split("x"))
    policy = POLICIES[dtype]
    sim = ServingSimulator(cfg, chip=chip, mesh=tf.tensor_parallel_mesh(cfg, data, model, chip=chip),
                           precision=mtia_jax.PrecisionPolicy(**policy) if policy else None, slo=slo,
                           prefix_caching=prefix_caching)
    rows = []
    for rate, reqs in loads:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs), desc=f"{chip} {dtype} {rate:g} req/s", leave=False, file=sys.stderr)
        result = sim.run(reqs, progress=bar)
        if bar is not None:
            bar.close()
        rows.append((rate, result))
    return sim, rows


def table(title: str, rows) -> str:
    head = (f"{'req/s':>6} {'reqs':>6} {'tok/s':>8} {'goodput':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TPOT p50':>9} {'TPOT p99':>9} {'ITL p99':>8} {'E2E p99':>8} {'preempt':>7} {'max seqs':>8} "
            f"{'J/token':>8} {'cached':>6}")
    lines = [title, head + "   (ms; reqs: requests served; goodput in requests/s meeting the SLO; J/token "
                           "over every device, idle time between requests included; cached: prompt "
                           "tokens served by the prefix cache)"]
    for rate, r in rows:
        m = r.metrics
        lines.append(f"{rate:>6.4g} {m.requests:>6} {m.throughput:>8.0f} {m.goodput:>8.2f} {m.ttft.p50 * 1e3:>9.1f} "
                     f"{m.ttft.p99 * 1e3:>9.1f} {m.tpot.p50 * 1e3:>9.2f} {m.tpot.p99 * 1e3:>9.2f} "
                     f"{m.itl.p99 * 1e3:>8.2f} {m.e2e.p99 * 1e3:>8.0f} {r.preemptions:>7} {r.max_running:>8} "
                     f"{r.joules_per_token:>8.3f} {r.prefix_cached_tokens / max(r.prompt_tokens, 1):>6.0%}")
    return "\n".join(lines)


def plot(path: Path, runs: dict, slo) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for label, rows in runs.items():
        rows = [(rate, r) for rate, r in rows if math.isfinite(rate)]  # a burst has no rate to plot
        rates = [rate for rate, _ in rows]
        axes[0].plot(rates, [r.metrics.goodput for _, r in rows], "o-", label=label)
        axes[1].plot(rates, [r.metrics.ttft.p99 * 1e3 for _, r in rows], "o-", label=f"{label} p99")
        axes[1].plot(rates, [r.metrics.ttft.p50 * 1e3 for _, r in rows], "x--", label=f"{label} p50")
        axes[2].plot(rates, [r.metrics.tpot.p99 * 1e3 for _, r in rows], "o-", label=f"{label} p99")
        axes[2].plot(rates, [r.metrics.tpot.p50 * 1e3 for _, r in rows], "x--", label=f"{label} p50")
        axes[3].plot(rates, [r.joules_per_token for _, r in rows], "o-", label=label)
    axes[1].axhline(slo.ttft_s * 1e3, color="grey", lw=0.8)
    axes[2].axhline(slo.tpot_s * 1e3, color="grey", lw=0.8)
    for ax, title in zip(axes, ("goodput (requests/s meeting the SLO)", "TTFT (ms)", "TPOT (ms)",
                                "J/token, every device, idle included")):
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-70b")
    p.add_argument("--chip", default="mtia450", help="one chip, or several separated by commas")
    p.add_argument("--mesh", default="1x8", help="data x model, e.g. 1x8")
    p.add_argument("--dtype", default="mx4", help=f"one of {sorted(POLICIES)}, or several separated by commas")
    p.add_argument("--rates", default=None,
                   help="requests/s, separated by commas (default 1,4,16,32,64,128). With --trace: each rate "
                        "R is a run of the trace's requests with arrivals t -> (t - first arrival) x own / R, "
                        "own being the trace's rate, requests / (last - first arrival); without --rates, one "
                        "run at the trace's own timing")
    p.add_argument("--trace", type=Path, default=None,
                   help="JSONL file of requests, one {\"arrival_s\", \"prompt_len\", \"output_len\"} object a "
                        "line (models.load.read_trace), instead of Poisson arrivals; excludes --requests, "
                        "--prompt, --output and --seed")
    p.add_argument("--requests", type=int, default=None, help="requests per rate (default 300)")
    p.add_argument("--prompt", type=_pair, default=None, help="low,high prompt tokens (uniform; default 128,2048)")
    p.add_argument("--output", type=_pair, default=None, help="low,high output tokens (uniform; default 64,512)")
    p.add_argument("--shared-prefix", default=None, metavar="N[:G]",
                   help="put one of G (default 1) shared system prompts of N tokens in front of every "
                        "prompt (models.load.with_shared_prefix), which the prefix cache serves once")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--ttft-ms", type=float, default=500.0)
    p.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the Poisson load (default 0)")
    p.add_argument("--max-len", type=int, default=8192,
                   help="positions a fixed-slot cache reserves per sequence (the served context length)")
    p.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "serving_sweep.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for dtype in args.dtype.split(","):
        if dtype not in POLICIES:
            p.error(f"unknown --dtype {dtype!r}; choose from {sorted(POLICIES)}")
    rates = None if args.rates is None else [float(r) for r in args.rates.split(",")]
    if rates is not None and not all(r > 0 for r in rates):
        p.error(f"--rates must be positive, got {args.rates}")
    if args.trace is not None:
        given = [f"--{name}" for name in ("requests", "prompt", "output", "seed") if getattr(args, name) is not None]
        if given:
            p.error(f"{', '.join(given)}: for the generated load only; with --trace the requests come from "
                    f"the trace")
        try:
            trace = load.read_trace(args.trace)
        except (OSError, ValueError) as error:
            p.error(f"--trace: {error}")
        if not trace:
            p.error(f"--trace: {args.trace} holds no requests")
        own = trace_rate(trace)
        if rates is not None and own == float("inf"):
            p.error(f"--trace: every request of {args.trace} arrives at once, so --rates has nothing to scale")
        loads = trace_loads(trace, rates)
        prompts, outputs = [r.prompt_len for r in trace], [r.output_len for r in trace]
        workload = (f"trace {args.trace.name}: {len(trace)} requests, prompts {min(prompts)}-{max(prompts)}, "
                    f"outputs {min(outputs)}-{max(outputs)}")
        print(f"load: {len(trace)} requests from the trace {args.trace} (arrivals over "
              f"{trace[-1].arrival_s - trace[0].arrival_s:g} s, own rate {own:.4g} requests/s); "
              + ("one run at its own timing" if rates is None else
                 "its arrival times scaled to each rate of --rates"))
        lengths = [r.prompt_len + r.output_len for r in trace]
    else:
        requests = 300 if args.requests is None else args.requests
        prompt = (128, 2048) if args.prompt is None else args.prompt
        output = (64, 512) if args.output is None else args.output
        seed = 0 if args.seed is None else args.seed
        rates = [1.0, 4.0, 16.0, 32.0, 64.0, 128.0] if rates is None else rates
        loads = poisson_loads(rates, requests, prompt, output, seed)
        workload = f"{requests} requests, prompts U{prompt}, outputs U{output}"
        print(f"load: Poisson arrivals generated per rate (seed {seed}): {workload}")
        lengths = [r.prompt_len + r.output_len for r in load.poisson(1.0, 100_000, load.Uniform(*prompt),
                                                                    load.Uniform(*output), seed=seed)]
    if args.shared_prefix is not None:
        try:
            n, _, g = args.shared_prefix.partition(":")
            n, g = int(n), int(g or 1)
            loads = [(rate, load.with_shared_prefix(reqs, n, g, seed=1)) for rate, reqs in loads]
        except ValueError as error:
            p.error(f"--shared-prefix {args.shared_prefix}: {error} (expected N or N:G, positive ints)")
        workload += f", after one of {g} shared {n}-token prefixes"
        print(f"load: each prompt starts with one of {g} shared prefixes of {n} tokens")
        lengths = [length + n for length in lengths]
    start = time.perf_counter()
    slo = load.SLO(args.ttft_ms / 1e3, args.tpot_ms / 1e3)
    runs = {}
    for chip in args.chip.split(","):
        for dtype in args.dtype.split(","):
            sim, rows = sweep(args.preset, chip, args.mesh, dtype, loads, slo, progress=not args.no_progress,
                              prefix_caching=not args.no_prefix_caching)
            label = f"{chip} {dtype}"
            runs[label] = rows
            print(table(f"{args.preset} on {args.mesh} x {chip}, {dtype}; {workload}; SLO TTFT <= "
                        f"{args.ttft_ms:g} ms, TPOT <= {args.tpot_ms:g} ms; {sim.kv_blocks} KV blocks of "
                        f"{sim.block_size}; {sim.times.estimates} step shapes estimated (modeled)", rows))
            # how many sequences of this workload's lengths (a trace's repeated) the pool holds at
            # once, paged vs fixed slots
            positions = sim.kv_blocks * sim.block_size
            if max(lengths) > args.max_len:
                print(f"(a sequence of {max(lengths)} positions exceeds --max-len {args.max_len}: no "
                      f"fixed-slot comparison)")
            else:
                fixed, paged = concurrent_sequences(itertools.islice(itertools.cycle(lengths), 100_000),
                                                    positions, max_len=args.max_len, block_size=sim.block_size)
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
