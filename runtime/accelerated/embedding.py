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
    granules (``ACCESS_GRANULE_BYTES``); these bytes are ``random_access_bytes``,
    which the cost model times at the chip's
    ``ChipSpec.hbm_random_access_efficiency`` of the HBM bandwidth. The table
    itself is never streamed. The indices, offsets/lengths and weights are
    read once in order, the pooled result written once.

vector work (float32: rows are pooled in float32)
    one operation per gathered element (R D: an add for "sum"/"mean", a
    compare for "max"), plus R D multiplies by the per-sample weights when
    weighted and one divide per output element for "mean".
"""

from __future__ import annotations

import math

import numpy as np

from runtime.op_work import OpWork

# assumption: the DRAM access granule of a random row read. HBM3 and LPDDR5
# move 32-byte bursts (a pseudo-channel / x16 channel with burst length 8 /
# 16); memory controllers and on-chip caches commonly fetch 64-byte lines, so a
# row read costs whole 64-byte granules. Not published for MTIA.
ACCESS_GRANULE_BYTES = 64


def gathered_row_bytes(row_bytes: int) -> int:
    """Bytes a random read of one ``row_bytes`` row moves: whole 64-byte granules."""
    return math.ceil(row_bytes / ACCESS_GRANULE_BYTES) * ACCESS_GRANULE_BYTES


def _embedding_bag_work(op) -> OpWork:
    table, indices, *streamed = (v.type for v in op.operands)
    out = op.results[0].type
    d = table.shape[-1]
    rows = indices.size
    gathered = rows * gathered_row_bytes(d * table.dtype.itemsize)
    flops = rows * d
    if op.params["weighted"]:
        flops += rows * d
    if op.params["mode"] == "mean":
        flops += out.size
    return OpWork(
        flops=flops,
        engine="vector",
        dtype=np.dtype(np.float32),
        hbm_bytes=gathered + indices.nbytes + sum(v.nbytes for v in streamed) + out.nbytes,
        random_access_bytes=gathered,
    )


RULES = {"embedding_bag": _embedding_bag_work}
