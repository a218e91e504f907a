"""Collectives cost model: alpha-beta times on the chip's scale-up network.

Per collective op (``lowering.collectives``) over a group of p devices, with
the per-device buffer of N bytes, link bandwidth B (unidirectional, per
device, times ``ChipSpec.collective_efficiency``: the achievable fraction)
and per-hop latency L from the chip catalogue:

| kind           | ring (bandwidth-optimal)          | tree (latency-optimal)          |
|----------------|-----------------------------------|---------------------------------|
| all_reduce     | 2 (p-1)/p N/B + 2 (p-1) L         | 2 ceil(log2 p) (N/B + L)        |
| all_gather     | (p-1)/p N_out/B + (p-1) L         | -                               |
| reduce_scatter | (p-1)/p N_in/B + (p-1) L          | -                               |
| all_to_all     | (p-1)/p N/B + (p-1) L             | -                               |
| permute        | N/B + L                           | -                               |

(the classic alpha-beta costs: Thakur, Rabenseifner and Gropp, "Optimization
of Collective Communication Operations in MPICH", IJHPCA 2005). The faster
algorithm is chosen per size. Reductions also add (p-1)/p N/itemsize
elements; chips with near-memory reduction (``near_memory_reduce`` in
``ChipSpec.units``: MTIA's message engines reduce next to memory) do that
for free, others pay it on the vector units.

An ``all_to_all`` whose op carries ``payload_bytes`` (the expert-parallel
dispatch and return of ``moe_ffn``) is costed with that N instead of its
buffer's size: its executed buffer has a row for every (expert, token) pair,
but the chip sends only the routed rows (modeling assumption, balanced
routing; the op's ``payload`` attribute says so in the IR).
"""

from __future__ import annotations

import math

import numpy as np

from lowering.ir import Op


def _ring(p: int, nbytes: float, bw: float, lat: float, factor: float = 1.0) -> float:
    return factor * ((p - 1) / p * nbytes / bw + (p - 1) * lat)


def collective_time(op: Op, chip) -> tuple[float, str, float]:
    """(seconds, algorithm, bytes sent per device) of one collective op on ``chip``."""
    p = int(op.attrs.get("group", 1))
    if p <= 1:
        return 0.0, "local", 0.0
    bw, lat = chip.scaleup_link_bandwidth * chip.collective_efficiency, chip.scaleup_link_latency_s
    x, out = op.operands[0].type, op.results[0].type
    kind = op.kind
    if kind == "all_reduce":
        n = x.nbytes
        options = {"ring": _ring(p, n, bw, lat, 2.0),
                   "tree": 2 * math.ceil(math.log2(p)) * (n / bw + lat)}
        algorithm = min(options, key=options.get)
        time, sent = options[algorithm], 2 * (p - 1) / p * n
    elif kind == "all_gather":
        algorithm, time, sent = "ring", _ring(p, out.nbytes, bw, lat), (p - 1) / p * out.nbytes
    elif kind in ("reduce_scatter", "all_to_all"):
        n = op.attrs.get("payload_bytes", x.nbytes)
        algorithm, time, sent = "ring", _ring(p, n, bw, lat), (p - 1) / p * n
    elif kind == "permute":
        algorithm, time, sent = "direct", x.nbytes / bw + lat, float(x.nbytes)
    else:
        raise KeyError(f"no collective cost rule for '{kind}'")
    if kind in ("all_reduce", "reduce_scatter") and "near_memory_reduce" not in chip.units:
        elements = (p - 1) / p * x.size
        time += elements / chip.vector_peak(np.dtype(x.dtype) if not hasattr(x.dtype, "format") else "fp32")
    return time, algorithm, sent
