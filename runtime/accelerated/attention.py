"""Work rules for ``flash_attention`` and ``paged_attention`` (see ``runtime.accelerated``).

Two ops have kind ``flash_attention``: the primitive
(``mtia_jax.primitives.flash_attention``: query (B, T, N, H), key/value
(B, S, K, H), read from its operand shapes and params) and the op the
attention pass makes of attention written in plain jnp (read from its
``attrs``, see ``lowering.passes.attention``). Both are priced as one
FlashAttention kernel:

- FLOPs = 2·B·N·T·S·H (Q Kᵀ) + 2·B·N·T·S·Hv (P V) = 4·B·N·T·S·H, on the matrix
  engine at the chip's rate for the query dtype. Only the (t, s) positions a
  kernel must compute are counted, when static shapes tell: jax's causal mask
  (query t sees keys 0..t) and local windows (left, right) are counted
  exactly (``visible_fraction``; a kernel skips the KV tiles a query tile
  cannot see, which approaches the exact count when T, S >> the tile), and a
  constant mask in a recognised jnp pattern by its fraction of True entries.
  Per-sequence lengths (decode against a KV cache) are runtime values: the
  whole capacity S is charged. A fully masked row is charged all S keys (jax
  attends it uniformly to every key).
- transcendentals = B·N·T·S (one exp per computed score), ``unit=
  "flash_attention"``: a chip with the FlashAttention unit (MTIA 450/500 in
  the catalogue) runs them in the unit beside the matrix engine; any other
  chip pays them on the vector units. (The few vector ops per score of the
  online softmax - running max, rescale, sum - are not counted separately.)
- HBM bytes = the operands (q, k, v, and bias/mask/lengths when present) and
  the output; the (B, N, T, S) score matrix is never materialized. Under
  ``PrecisionPolicy(kv_cache=...)`` (the param ``kv_format``) K and V are
  read packed in that MX format.
- ``bytes_saved_by_unit``: without the unit, a software FlashAttention kernel
  streams K and V through a PE once per *query block*, so K and V are read
  ceil(G·T / Tq) times instead of once (the G = N / K query heads that share a
  KV head are packed into one block of rows). The query-block size Tq is
  ``lowering.passes.attention.query_block_rows``: the rows whose Q tile, fp32
  output accumulator, running max/sum and score tile fit one PE's local
  memory next to double-buffered K/V tiles (assumption: each PE streams its
  own K/V from HBM; no broadcast of K/V tiles across PEs is modeled). The
  attention pass records it for the compile's chip as ``attrs["q_block"]``.

``paged_attention`` (``mtia_jax.primitives.paged_attention``: q (N, heads, H)
of N tokens of B sequences, K/V pools (num_blocks, bs, K, H), block tables
(B, W), seq_ids and positions (N,)) is priced as one FlashAttention kernel
that walks each sequence's blocks once for all its query tokens:

- FLOPs = 4·N·heads·(W·bs)·H: every query is charged its table's full width
  W·bs (positions are runtime values, as lengths against a KV cache are for
  ``flash_attention``); transcendentals = N·heads·W·bs, ``unit=
  "flash_attention"``, matrix engine at q's dtype.
- HBM bytes by touch: q; of each pool the B·W blocks the tables name, once
  per step (B·W·bs·K·H elements, packed under a ``kv_format``), at most the
  pool itself (a step that would read more streams the pool); the block
  tables, seq_ids and positions; the output. The rest of the pool is not
  read. Each block is one contiguous run at a data-dependent place: one
  random access per block (none when the pool is streamed). Blocks are not
  rounded up to access granules (a block of a real cache is kilobytes).
  Every query is charged against all B tables' blocks: a per-device kernel
  of a token-split step is charged the whole tables too (an upper bound).
- ``bytes_saved_by_unit``: as ``flash_attention``'s, with the query rows of a
  KV head of one sequence ``G·ceil(N / B)`` (the G = heads / K query heads of
  a KV head times the tokens of an average sequence): a software kernel
  re-reads a sequence's K/V blocks once per query block of those rows.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lowering.ir import Op, TensorType
from lowering.passes.attention import query_block_rows
from runtime.accelerated.mx_matmul import packed_bytes
from runtime.work import OpWork


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the cost of one attention depends on."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: np.dtype   # query dtype: the matrix engine's rate
    visible: float    # fraction of the B·N·T·S scores a kernel computes
    q_block: int      # query rows per block of a software kernel

    @property
    def scores(self) -> float:
        return float(self.batch * self.heads * self.q_len * self.kv_len) * self.visible

    @property
    def kv_bytes(self) -> int:
        """K and V as stored: (B, S, K, H) and (B, S, K, Hv)."""
        return (self.batch * self.kv_len * self.kv_heads * (self.head_dim + self.value_dim)
                * np.dtype(self.dtype).itemsize)


def visible_fraction(q_len: int, kv_len: int, is_causal: bool,
                     local_window_size: tuple[int, int] | None) -> float:
    """The fraction of (t, s) positions jax's causal mask (s <= t) and local
    window (t - left <= s <= t + right) leave visible; a row with none visible
    counts all S (jax attends it uniformly to every key)."""
    if not is_causal and local_window_size is None:
        return 1.0
    t = np.arange(q_len, dtype=np.int64)
    lo = np.zeros_like(t)
    hi = np.full_like(t, kv_len - 1)
    if is_causal:
        hi = np.minimum(hi, t)
    if local_window_size is not None:
        left, right = local_window_size
        lo = np.maximum(lo, t - left)
        hi = np.minimum(hi, t + right)
    count = np.clip(hi - lo + 1, 0, None)
    count = np.where(count == 0, kv_len, count)
    return float(count.sum()) / (q_len * kv_len)


def _q_block(op: Op, head_dim: int, value_dim: int, dtype) -> int:
    block = op.attrs.get("q_block")
    if block is None:  # an op the attention pass has not seen: the default chip's PEs
        from mtia_jax import chips
        block = query_block_rows(chips.default(), head_dim, value_dim, np.dtype(dtype).itemsize)
    return int(block)


def _primitive_shape(op: Op) -> AttentionShape:
    query, key, value = (v.type for v in op.operands[:3])
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads, value_dim = key.shape[1], key.shape[2], value.shape[3]
    p = op.params
    return AttentionShape(batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim,
                          np.dtype(query.dtype),
                          visible_fraction(q_len, kv_len, p["is_causal"], p["local_window_size"]),
                          _q_block(op, head_dim, value_dim, query.dtype))


def _pattern_shape(op: Op) -> AttentionShape:
    a = op.attrs
    dtype = np.dtype(a["dtype"])
    value_dim = a.get("value_dim", a["head_dim"])
    return AttentionShape(a["batch"], a["q_len"], a["kv_len"], a["heads"], a["kv_heads"],
                          a["head_dim"], value_dim, dtype, float(a.get("visible", 1.0)),
                          _q_block(op, a["head_dim"], value_dim, dtype))


def attention_shape(op: Op) -> AttentionShape:
    """The attention an op of kind ``flash_attention`` computes: the primitive
    (which carries its JAX primitive) or a recognised jnp pattern."""
    return _primitive_shape(op) if op.primitive is not None else _pattern_shape(op)


def flash_attention_work(op: Op) -> OpWork:
    """The ``OpWork`` of one ``flash_attention`` op (see the module docstring)."""
    a = attention_shape(op)
    rows_per_kv_head = (a.heads // a.kv_heads) * a.q_len
    kv_passes = max(math.ceil(rows_per_kv_head / a.q_block) * a.visible, 1.0)
    reads, kv_bytes = None, a.kv_bytes
    kv_format = op.params.get("kv_format") if op.primitive is not None else None
    if kv_format is not None:  # a KV cache stored in MX (PrecisionPolicy(kv_cache=...))
        q, k, v, *rest = (o.type for o in op.operands)
        reads = (q.nbytes, packed_bytes(k, kv_format, -1), packed_bytes(v, kv_format, -1),
                 *(t.nbytes for t in rest))
        kv_bytes = reads[1] + reads[2]
    return OpWork(flops=2.0 * a.scores * (a.head_dim + a.value_dim),
                  transcendentals=a.scores, engine="matrix", dtype=a.dtype, reads=reads,
                  unit="flash_attention", bytes_saved_by_unit=kv_bytes * (kv_passes - 1.0))


def _pool_read(pool: TensorType, blocks: int, kv_format: str | None) -> tuple[int, int]:
    """(bytes, random accesses) of reading ``blocks`` blocks of a KV ``pool``
    (num_blocks, bs, K, H), packed in ``kv_format`` when given: one access per
    block, or the whole pool streamed when that is no more."""
    num_blocks, *block = pool.shape
    walked = packed_bytes(TensorType((blocks, *block), pool.dtype), kv_format, -1)
    whole = packed_bytes(pool, kv_format, -1)
    return (whole, 0) if walked >= whole else (walked, blocks)


def paged_attention_work(op: Op) -> OpWork:
    """The ``OpWork`` of one ``paged_attention`` op (see the module docstring)."""
    q, k_pool, v_pool, tables, seq_ids, positions = (v.type for v in op.operands)
    n, heads, head_dim = q.shape
    _, block_size, kv_heads, value_dim = v_pool.shape
    batch, width = tables.shape
    scores = float(n * heads * width * block_size)
    kv_format = op.params.get("kv_format")
    (k_bytes, k_accesses), (v_bytes, v_accesses) = (
        _pool_read(pool, batch * width, kv_format) for pool in (k_pool, v_pool))
    rows_per_kv_head = (heads // kv_heads) * math.ceil(n / batch)
    q_block = _q_block(op, head_dim, value_dim, q.dtype)
    kv_passes = max(math.ceil(rows_per_kv_head / q_block), 1)
    return OpWork(flops=2.0 * scores * (head_dim + value_dim), transcendentals=scores,
                  engine="matrix", dtype=np.dtype(q.dtype),
                  reads=(q.nbytes, k_bytes, v_bytes, tables.nbytes, seq_ids.nbytes,
                         positions.nbytes),
                  unit="flash_attention", bytes_saved_by_unit=(k_bytes + v_bytes) * (kv_passes - 1.0),
                  random_accesses=float(k_accesses + v_accesses))


RULES = {"flash_attention": flash_attention_work, "paged_attention": paged_attention_work}
