"""Serve a Llama-style model with continuous batching over a paged KV cache on a
modeled MTIA chip.

    python examples/serve_llama.py --preset tiny --chip mtia450 --dtype mx4 --requests 32
    python examples/serve_llama.py --preset tiny --mesh 1x8 --requests 8 --max-new-tokens 8
    python examples/serve_llama.py --preset llama3-70b --mesh 1x8 --request-rate 16 --requests 200

Random prompts of varied lengths (from a seeded generator) go through
``models.serving.ServingEngine`` (chunked prefill under a token budget,
prefix caching, preemption when ``--num-blocks`` runs out); a progress bar
(on stderr) counts finished requests, with the steps run and the modeled
tokens/s so far, and the summary prints host and modeled tokens/s, time to
first token, inter-token latency p50/p99, KV blocks and HBM use.
``--dtype`` bf16 runs the model's own dtype with no precision policy;
mx8/mx6/mx4 store the matmul weights in that MX format with mx8 activations.

``--request-rate R`` serves a Poisson load of R requests/s instead, from
shapes only (``models.serving_sim``: chunked prefill, paged KV cache,
preemption; no numerics run, so any preset works), prompts uniform in 16..1024
tokens and outputs in 16..``--max-new-tokens``, and prints TTFT / TPOT / ITL /
end-to-end percentiles and goodput, all modeled.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from tqdm import tqdm

import mtia_jax
from models import transformer as tf
from models import load
from models.serving import Request, SamplingParams, ServingEngine
from models.serving_sim import ServingSimulator

# --dtype -> precision policy (weights in that format, activations mx8)
POLICIES = {"bf16": None, "mx8": ("mx8", "mx8"), "mx6": ("mx6", "mx8"), "mx4": ("mx4", "mx8")}


def parse_mesh(text: str | None):
    """``"DxM"`` -> a ("data", "model") mesh, or None."""
    if text is None:
        return None
    try:
        d, m = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError("must look like DxM (e.g. 1x8)") from None
    return d, m


def run(engine: ServingEngine, requests: int) -> None:
    """Step ``engine`` until every request is done, under a tqdm bar of finished
    requests whose postfix shows the decode steps and modeled tokens/s so far."""
    with tqdm(total=requests, unit="req", desc="requests", file=sys.stderr) as bar:
        while not engine.done:
            finished = engine.step()
            stats = engine.stats()
            bar.set_postfix_str(f"{stats.steps} steps, modeled "
                                f"{stats.modeled_tokens_per_s:,.0f} tokens/s")
            bar.update(len(finished))


def simulate(args, cfg, policy, mesh_shape) -> int:
    """``--request-rate``: the load through the shapes-only simulator."""
    mesh = None if mesh_shape is None else tf.tensor_parallel_mesh(cfg, *mesh_shape, chip=args.chip)
    sim = ServingSimulator(cfg, chip=args.chip, mesh=mesh, precision=policy)
    requests = load.poisson(args.request_rate, args.requests, load.Uniform(16, 1024),
                            load.Uniform(16, max(16, args.max_new_tokens)), seed=args.seed)
    print(f"serving {args.requests} requests at {args.request_rate:g}/s: {args.preset} on {args.chip}"
          f"{' mesh ' + args.mesh if mesh else ''}, dtype {args.dtype}, from shapes (modeled)", flush=True)
    with tqdm(total=args.requests, unit="req", desc="requests", file=sys.stderr) as bar:
        result = sim.run(requests, progress=bar)
    print(result.metrics.summary())
    print(f"  {result.steps} steps, {result.preemptions} preemptions, up to {result.max_running} sequences "
          f"at once, {result.kv_blocks} KV blocks of {sim.block_size}; {result.joules_per_token:.3g} J/token "
          f"over every device, idle between requests included (modeled)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(tf.PRESETS),
                    help="models.transformer preset (default tiny)")
    ap.add_argument("--chip", default="mtia450", choices=mtia_jax.chips.names(),
                    help="modeled chip (default mtia450)")
    ap.add_argument("--dtype", default="mx4", choices=sorted(POLICIES), help="weight format (default mx4)")
    ap.add_argument("--requests", type=int, default=32, help="number of requests (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="max new tokens per request (default 16)")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="most sequences per step (default 8)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512,
                    help="token budget of a step (default 512)")
    ap.add_argument("--block-size", type=int, default=16, help="positions per KV block (default 16)")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV blocks in the pool (default: max-num-seqs sequences of max-len)")
    ap.add_argument("--no-chunked-prefill", action="store_true", help="schedule each prompt whole")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-len", type=int, default=None, help="positions per sequence (default: "
                    "min(model max, 64))")
    ap.add_argument("--mesh", default=None, help="DxM logical mesh over ('data', 'model'), e.g. 1x8")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of prompts, weights and sampling")
    ap.add_argument("--request-rate", type=float, default=None,
                    help="requests/s of a Poisson load, served from shapes only (see above)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.max_new_tokens < 1 or args.max_num_seqs < 1:
        ap.error("--requests, --max-new-tokens and --max-num-seqs must be >= 1")

    cfg = tf.Config.preset(args.preset)
    formats = POLICIES[args.dtype]
    policy = None if formats is None else mtia_jax.PrecisionPolicy(weights=formats[0], activations=formats[1])
    try:
        mesh_shape = parse_mesh(args.mesh)
        mesh = None if mesh_shape is None else mtia_jax.make_mesh(mesh_shape, ("data", "model"),
                                                                  chip=args.chip)
    except ValueError as e:
        ap.error(f"--mesh {args.mesh}: {e}")

    if args.request_rate is not None:
        return simulate(args, cfg, policy, mesh_shape)
    max_len = args.max_len or min(cfg.max_seq_len, 64)
    if max_len - args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {max_len} positions")
    params = tf.init_params(cfg, jax.random.key(args.seed))
    try:
        engine = ServingEngine(cfg, params, max_num_seqs=args.max_num_seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens, max_len=max_len,
                               block_size=args.block_size, num_blocks=args.num_blocks,
                               chunked_prefill=not args.no_chunked_prefill,
                               prefix_caching=not args.no_prefix_caching, chip=args.chip,
                               precision=policy, mesh=mesh)
    except ValueError as e:
        ap.error(str(e))
    rng = np.random.default_rng(args.seed)
    longest = min(max_len - args.max_new_tokens, 48)
    for i in range(args.requests):
        n = int(rng.integers(1, longest + 1))
        engine.submit(Request(prompt=rng.integers(0, cfg.vocab, n).tolist(),
                              max_new_tokens=int(rng.integers(1, args.max_new_tokens + 1)),
                              sampling=SamplingParams(args.temperature, args.top_k, args.top_p,
                                                      seed=args.seed + i)))

    print(f"serving {args.requests} requests: {args.preset} on {args.chip}"
          f"{' mesh ' + args.mesh if mesh else ''}, dtype {args.dtype}, up to {args.max_num_seqs} "
          f"sequences per step, max_len {max_len}, {engine.num_blocks} KV blocks of {engine.block_size}",
          flush=True)
    run(engine, args.requests)
    print(engine.stats().table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
