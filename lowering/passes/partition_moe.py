"""Partition rules for ``moe_ffn`` (expert parallelism with all-to-all
dispatch) and ``mx_matmul`` (MX blocks kept whole).

``moe_ffn(x (T, D), router_logits (T, E), w_gate/w_up (E, D, F), w_down (E, F, D))``:

- tokens keep their split (data parallelism);
- each expert's FFN width F may be split over another axis (tensor
  parallelism): the output is then a partial sum over that axis;
- the experts E may be split over a mesh axis of G devices (expert
  parallelism): device i owns experts [i E/G, (i+1) E/G). Every device
  routes its tokens over all E logits (the unsharded routing), dispatches a
  copy of each token to the devices owning its k experts with one
  ``all_to_all``, runs its own experts, sends the results back with a
  second ``all_to_all`` and combines them with the gate weights (the
  per-device kernels ``moe_dispatch``, ``moe_experts`` and ``moe_combine``
  of ``mtia_jax.primitives.moe_ffn``, which give the unsharded numerics up
  to float32 summation order). When the tokens are split over the expert
  axis too (classic expert parallelism) each device dispatches its own
  tokens. When they are not (every device of the group holds the same
  tokens), each device takes its share: the tokens are padded to a multiple
  of G with zero rows, split locally (``shard_slice``), and the outputs are
  all-gathered and the padding dropped, so the output keeps the tokens'
  placement.

The dispatch buffer holds a row for every (expert, token) pair, zeros where
the token does not go, so that no capacity limit ever drops a token; a chip
sends only the routed rows (a ragged all-to-all). Each ``all_to_all``
records ``payload_bytes``, the bytes the chip sends, which the collectives
cost model uses instead of the buffer's size: modeling assumption, routing
balanced over the experts, so each device sends its T k routed rows of D
elements (the activation dtype on the way out, float32 on the way back),
spread evenly over the group; its ``payload`` attribute says so in the IR.

``mx_matmul(a (*batch, M, K), b (K, N) or (*batch, K, N))``: like a
``dot_general``, batch, M and N keep their split and a split K gives a
partial sum, but K may be split only when every device's K is a whole
number of MX blocks (then each device quantizes exactly the unsharded
program's blocks); otherwise K is gathered first. Partial sums reaching an
operand are added up first (quantization is not linear). Pre-quantized
operands (elements and scales) split alike.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from lowering.ir import Op, TensorType, Value
from lowering.passes.partitioner import Partitioner, overlaps, spec_axes
from mtia_jax.primitives.moe_ffn import moe_combine_p, moe_dispatch_p, moe_experts_p
from mtia_jax.primitives.mx_matmul import operand_layout

# the experts' outputs travel back in the kernel's float32 accumulator, so
# that the combine is the unsharded kernel's float32 combine
RETURN_DTYPE = np.dtype(np.float32)
ROUTED_PAYLOAD = "modeled: routed rows only, balanced over experts (assumption)"


# ------------------------------------------------------------ per-device ops

def _emit_primitive(p: Partitioner, primitive, operands: list[Value], shape: tuple, dtype,
                    params: dict, **attrs) -> Value:
    """One generic op binding ``primitive`` on per-device operands."""
    (result,) = p.emit(primitive.name, operands, [TensorType(tuple(shape), np.dtype(dtype))],
                       {"primitive": primitive, "params": params, **attrs})
    return result


def _pad_rows(p: Partitioner, v: Value, rows: int) -> Value:
    """``v`` with zero rows appended up to ``rows`` rows."""
    n, *rest = v.type.shape
    if rows == n:
        return v
    zero = Value(TensorType((), v.type.dtype))
    p.ops.append(Op("constant", [], [zero], {"value": np.zeros((), v.type.dtype)}, p.source))
    config = ((0, rows - n, 0),) + ((0, 0, 0),) * len(rest)
    return _emit_primitive(p, lax.pad_p, [v, zero], (rows, *rest), v.type.dtype,
                           {"padding_config": config})


def _first_rows(p: Partitioner, v: Value, rows: int) -> Value:
    """The first ``rows`` rows of ``v``."""
    n, *rest = v.type.shape
    if rows == n:
        return v
    return _emit_primitive(p, lax.slice_p, [v], (rows, *rest), v.type.dtype,
                           {"start_indices": (0,) * (1 + len(rest)), "limit_indices": (rows, *rest),
                            "strides": None})


def _expert_parallel(p: Partitioner, op: Op, x: Value, logits: Value, weights: list[Value],
                     axis: str) -> Value:
    """The per-device ops of ``op`` with its experts split over ``axis``, on
    this device's tokens ``x`` (T, D) and ``logits`` (T, E): its output (T, D)."""
    group, top_k = p.mesh[axis], op.params["top_k"]
    num_experts, dtype = logits.type.shape[1], np.dtype(op.results[0].type.dtype)
    tokens, d = x.type.shape
    local = num_experts // group
    send = _emit_primitive(p, moe_dispatch_p, [x, logits], (num_experts, tokens, d), dtype,
                           {"top_k": top_k, "dtype": dtype})
    rows = p.collective("all_to_all", send, (local, group * tokens, d), axis=axis, split=0, concat=1,
                        payload_bytes=tokens * top_k * d * dtype.itemsize, payload=ROUTED_PAYLOAD)
    outs = _emit_primitive(p, moe_experts_p, [rows, *weights], rows.type.shape, RETURN_DTYPE, {},
                           top_k=top_k, experts=num_experts)
    back = p.collective("all_to_all", outs, (num_experts, tokens, d), axis=axis, split=1, concat=0,
                        payload_bytes=tokens * top_k * d * RETURN_DTYPE.itemsize, payload=ROUTED_PAYLOAD)
    return _emit_primitive(p, moe_combine_p, [back, logits], (tokens, d), dtype,
                           {"top_k": top_k, "dtype": dtype})


def _token_share(p: Partitioner, op: Op, x: Value, logits: Value, weights: list[Value],
                 axis: str) -> Value:
    """Expert parallelism over ``axis`` for tokens every device of the group
    holds: each device takes its share (padded with zero rows to a multiple
    of the group), and the outputs are gathered back."""
    group, tokens = p.mesh[axis], x.type.shape[0]
    share = -(-tokens // group)
    mine = [p.collective("shard_slice", _pad_rows(p, v, share * group),
                         (share, v.type.shape[1]), axis=axis, dim=0) for v in (x, logits)]
    out = _expert_parallel(p, op, *mine, weights, axis)
    out = p.collective("all_gather", out, (share * group, out.type.shape[1]), axis=axis, dim=0)
    return _first_rows(p, out, tokens)


# ------------------------------------------------------------ rules

def _expert_axis(p: Partitioner, op: Op) -> str | None:
    """The mesh axis the experts split over (the major one of a several-axis
    split; the others are gathered), if it divides E."""
    w_gate, w_up, w_down = op.operands[2:]
    axes = spec_axes(p.spec[w_gate][0] or p.spec[w_up][0] or p.spec[w_down][0])
    if not axes or not p.fits(w_gate.type.shape[0], axes[0]):
        return None
    return axes[0]


def _moe_ffn_rule(p: Partitioner, op: Op) -> None:
    """Data, tensor and expert parallelism (see the module docstring)."""
    x, logits, w_gate, w_up, w_down = op.operands
    for v in op.operands:
        p.resolve(v)
    t = p.spec[x][0]
    e = _expert_axis(p, op)
    f = p.spec[w_gate][2] or p.spec[w_down][1]
    if overlaps(f, [t, e]):
        f = None
    lx, llogits = p.to_spec(x, (t, None)), p.to_spec(logits, (t, None))
    weights = [p.to_spec(w_gate, (e, None, f)), p.to_spec(w_up, (e, None, f)),
               p.to_spec(w_down, (e, f, None))]
    partial = frozenset({f}) if f else frozenset()
    if e is None:
        return p.same_op(op, [lx, llogits, *weights], [(t, None)], partial)
    per_device = _expert_parallel if e in spec_axes(t) else _token_share
    p.bind(op.results[0], per_device(p, op, lx, llogits, weights, e), (t, None), partial)


def _mx_matmul_rule(p: Partitioner, op: Op) -> None:
    """``dot_general``-like, with K split only into whole MX blocks (see the
    module docstring)."""
    params = op.params
    na, _ = operand_layout(params)
    for v in op.operands:
        p.resolve(v)
    a, b = op.operands[0], op.operands[na]
    aspec, bspec = p.spec[a], p.spec[b]
    nbatch, batched = len(a.type.shape) - 2, len(b.type.shape) > 2
    k_size = a.type.shape[-1]
    quantized = params["a_format"] is not None or params["b_format"] is not None
    used: list = []

    def claim(entry, size: int, whole_blocks: bool = False):
        """``entry`` for a dim of ``size``, unless its axes are taken or do not divide it."""
        if entry is None or overlaps(entry, used) or not p.fits(size, entry):
            return None
        if whole_blocks and (size // p.mesh[entry]) % params["block_size"]:
            return None
        used.append(entry)
        return entry

    batch = tuple(claim(aspec[d] if aspec[d] is not None or not batched else bspec[d], a.type.shape[d])
                  for d in range(nbatch))
    m = claim(aspec[-2], a.type.shape[-2])
    k = claim(aspec[-1] if aspec[-1] is not None else bspec[-2], k_size, whole_blocks=quantized)
    n = claim(bspec[-1], b.type.shape[-1])
    a_target, b_target = batch + (m, k), (batch if batched else ()) + (k, n)
    operands = [p.to_spec(v, a_target if i < na else b_target) for i, v in enumerate(op.operands)]
    p.same_op(op, operands, [batch + (m, n)], frozenset({k}) if k else frozenset())


RULES = {
    "moe_ffn": _moe_ffn_rule,
    "mx_matmul": _mx_matmul_rule,
}
