"""Score synthetic Criteo-like batches with a DLRM on a modeled MTIA chip.

    python examples/serve_dlrm.py --chip mtia400 --batch 2048
    python examples/serve_dlrm.py --preset mlperf-dcnv2 --chip mtia400 --mesh 8

A small preset (parameters under ``--max-host-gb``) runs for real: the model
(random weights) is compiled once with ``mtia_jax.jit`` and scores
``--batches`` synthetic batches (``models.dlrm.synthetic_batch``); the host
queries/s are wall clock on this machine, compilation excluded. A large one
(``mlperf-dcnv2``: 26 billion parameters) is modeled from shapes only with
``mtia_jax.estimate``: nothing of its size is allocated.

A query is one sample: one user-item pair, one click-through prediction (an
MLPerf inference "sample" aggregates 100 to 700 of them).

Modeled figures, on the chosen chip (``--mesh N``: N chips, tables split
across them and the MLPs data parallel, see ``models.dlrm.shardings``):

- capacity queries/s = batch / modeled time of one batch;
- latency p50/p99 from a queue simulation: ``--queries`` queries arrive as a
  Poisson process at ``--load`` times the capacity; whenever the chip is
  free it takes every waiting query, up to ``--batch``, pads the batch to
  the next compiled size (``--batch`` halved down to 1/32 of it) and is busy
  for that size's modeled time; a query's latency is its wait plus the
  modeled time of its batch. Host-side work (feature preprocessing, the
  network) is not modeled.

``--dtype`` bf16 runs the model in bfloat16; mx8/mx4 also quantize the MLP
and cross weights to that MX format with mx8 activations (a precision
policy; the embedding tables stay bfloat16).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

import mtia_jax
from models import dlrm

# --dtype -> the precision policy's MX formats (weights, activations), or None (bfloat16)
DTYPES = {"bf16": None, "mx8": ("mx8", "mx8"), "mx4": ("mx4", "mx8")}
# assumption: the server compiles one program per batch size --batch, --batch / 2, ...,
# --batch / 32 (as serving stacks pad to a few compiled shapes) and pads a batch to the
# smallest that holds it
BUCKETS = 6


def batch_sizes(batch: int) -> list[int]:
    """The compiled batch sizes, smallest first."""
    return sorted({max(1, batch >> k) for k in range(BUCKETS)})


def simulate_queue(arrivals: np.ndarray, batch: int, batch_time: dict[int, float]) -> np.ndarray:
    """Latency of every query (seconds): one server that, when free, takes all
    queries that have arrived (up to ``batch``), pads them to the smallest
    size in ``batch_time`` that holds them and is busy for its time."""
    sizes = sorted(batch_time)
    latency = np.empty(len(arrivals))
    free, i = 0.0, 0
    while i < len(arrivals):
        start = max(free, arrivals[i])
        j = min(int(np.searchsorted(arrivals, start, side="right")), i + batch)
        size = next(s for s in sizes if s >= j - i)
        free = start + batch_time[size]
        latency[i:j] = free - arrivals[i:j]
        i = j
    return latency


def score_on_host(cfg, batch: int, batches: int, jitted, seed: int):
    """Score ``batches`` synthetic batches for real with ``jitted``:
    (host queries/s, compile seconds)."""
    params = dlrm.init_params(cfg, jax.random.key(seed))
    data = [dlrm.synthetic_batch(cfg, batch, seed + 1 + i)[:2] for i in range(batches)]
    start = time.perf_counter()
    compiled = jitted.lower(params, *data[0]).compile()
    jax.block_until_ready(compiled(params, *data[0]))  # the host program is built at the first call
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for dense, sparse in tqdm(data, desc="scoring batches", unit="batch"):
        logits = compiled(params, dense, sparse)
    jax.block_until_ready(logits)
    wall = time.perf_counter() - start
    return batch * batches / wall, compile_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(dlrm.PRESETS),
                    help="models.dlrm preset (default tiny)")
    ap.add_argument("--chip", default="mtia400", choices=mtia_jax.chips.names(),
                    help="modeled chip (default mtia400)")
    ap.add_argument("--batch", type=int, default=2048, help="largest batch (default 2048)")
    ap.add_argument("--mesh", type=int, default=None, help="number of chips (a 1-D mesh)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="default bf16")
    ap.add_argument("--batches", type=int, default=10, help="batches scored on the host (default 10)")
    ap.add_argument("--load", type=float, default=0.7,
                    help="arrival rate as a fraction of the modeled capacity (default 0.7)")
    ap.add_argument("--queries", type=int, default=100_000, help="simulated queries (default 100000)")
    ap.add_argument("--max-host-gb", type=float, default=1.0,
                    help="run presets with at most this many GB of parameters for real (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, data and arrivals")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.batches < 1 or args.queries < 1:
        ap.error("--batch, --batches and --queries must be >= 1")
    if not 0 < args.load < 1:
        ap.error(f"--load must be in (0, 1) for a stable queue, got {args.load}")

    cfg = dlrm.Config.preset(args.preset).replace(dtype="bfloat16")
    formats = DTYPES[args.dtype]
    policy = None if formats is None else mtia_jax.PrecisionPolicy(weights=formats[0],
                                                                   activations=formats[1])
    try:
        mesh = None if args.mesh is None else mtia_jax.make_mesh((args.mesh,), ("data",), chip=args.chip)
    except ValueError as e:
        ap.error(f"--mesh {args.mesh}: {e}")
    where = f"{args.mesh} x {args.chip}" if mesh is not None else args.chip
    param_bytes = dlrm.param_count(cfg) * cfg.param_dtype.itemsize
    on_host = param_bytes <= args.max_host_gb * 1e9
    print(f"DLRM {args.preset} ({cfg.interaction} interaction, {cfg.num_tables} tables, "
          f"{dlrm.param_count(cfg):,} parameters, {param_bytes / 1e9:.3g} GB) on {where}, "
          f"dtype {args.dtype}, batch {args.batch}"
          f"{'' if on_host else ' -- shapes only (modeled, nothing allocated)'}", flush=True)

    rows = [("model", f"{args.preset}: {cfg.num_tables} tables, multi-hot {sum(cfg.multi_hot)} ids "
                      f"per sample, {dlrm.param_count(cfg):,} parameters")]
    if on_host:
        in_shardings = None
        if mesh is not None:
            pspecs, (dspec, sspecs) = dlrm.shardings(cfg, mesh, args.batch)
            in_shardings = (pspecs, dspec, sspecs)
        jitted = mtia_jax.jit(functools.partial(dlrm.forward, cfg, mesh=mesh), chip=args.chip,
                              mesh=mesh, in_shardings=in_shardings, precision=policy)
        host_qps, compile_s = score_on_host(cfg, args.batch, args.batches, jitted, args.seed)
        rows.append(("host queries/s", f"{host_qps:,.0f} (wall, {args.batches} batches of "
                                       f"{args.batch}, excl. {compile_s:.2f} s compile)"))

    batch_time, full = {}, None
    for size in tqdm(batch_sizes(args.batch), desc="modeling batch sizes", unit="size"):
        report = dlrm.estimate(cfg, size, chip=args.chip, mesh=mesh, precision=policy)
        batch_time[size] = report.time_s
        full = report  # the largest size comes last
    capacity = args.batch / batch_time[args.batch]
    rate = args.load * capacity
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, args.queries))
    latency = simulate_queue(arrivals, args.batch, batch_time)
    ms = lambda s: f"{s * 1e3:.4g} ms"
    per = " per chip" if mesh is not None else ""
    rows += [
        ("modeled batch time", f"{ms(batch_time[args.batch])} for {args.batch} queries (roofline "
                               f"{ms(full.roofline_time_s)}); sizes "
                               + ", ".join(f"{s}: {ms(t)}" for s, t in sorted(batch_time.items()))),
        ("queries/s", f"modeled {capacity:,.0f} on {where} (batch {args.batch}, capacity)"),
        ("latency (modeled)", f"p50 {ms(np.percentile(latency, 50))}  p99 "
                              f"{ms(np.percentile(latency, 99))}  at {args.load:.0%} load"),
        ("queue", f"{args.queries:,} Poisson arrivals at {rate:,.0f} queries/s; batches of up to "
                  f"{args.batch} formed when the chip frees, padded to a compiled size; "
                  f"latency = wait + modeled batch time"),
        ("HBM" + per, f"peak {full.peak_hbm_bytes / 1e9:.4g} of {full.chip.hbm_bytes / 1e9:.4g} GB "
                      f"({'fits' if full.fits else 'DOES NOT FIT'}); sharding padding "
                      f"{dlrm.padding(cfg)['bytes'] / 1e6:.3g} MB in all"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
