"""Work rule for ``embedding_bag`` (``mtia_jax.primitives.embedding_bag``).

Operands of the op: ``table (N, D)`` (or a stack of tables ``(T, N, D)``),
``indices (S, n)`` or ``(S, B, L)``, then ``offsets``/``lengths (S, B)``
(flat forms), then per-sample weights (shaped like ``indices``) when
weighted; result ``(S, B, D)``. The work depends on the rows read, not on
how many tables they come from.

HBM bytes
    rows gathered: one per index entry, ``R = indices.size`` (the padded
    count for the 2-D form: the kernel reads the -1 entries too and skips
    them, and the count must be static). Each row is read at random, so it
    costs its ``D * itemsize`` bytes rounded up to whole 64-byte access
    granules (``runtime.work.ACCESS_GRANULE_BYTES``) and one random
    access, whose overhead the cost model takes from the chip's
    ``ChipSpec.hbm_random_access_efficiency``. The table itself is never
    streamed (unless the rows would move more than the whole table). The
    indices, offsets/lengths and weights are read once in order, the pooled
    result written once.

vector work (float32: rows are pooled in float32)
    one operation per gathered element (R D: an add for "sum"/"mean", a
    compare for "max"), plus R D multiplies by the per-sample weights when
    weighted and one divide per output element for "mean".
"""

from __future__ import annotations

import numpy as np

from runtime.work import OpWork, scattered_bytes


def _embedding_bag_work(op) -> OpWork:
    table, indices, *streamed = (v.type for v in op.operands)
    out = op.results[0].type
    d = table.shape[-1]
    rows = indices.size
    window = (1,) * (len(table.shape) - 1) + (d,)
    gathered, accesses = scattered_bytes(table, rows, window)
    flops = rows * d
    if op.params["weighted"]:
        flops += rows * d
    if op.params["mode"] == "mean":
        flops += out.size
    return OpWork(
        flops=flops,
        engine="vector",
        dtype=np.dtype(np.float32),
        reads=(gathered, indices.nbytes, *(v.nbytes for v in streamed)),
        random_accesses=accesses,
    )


RULES = {"embedding_bag": _embedding_bag_work}
