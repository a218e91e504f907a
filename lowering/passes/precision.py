"""Dtype policy pass: matmuls with a weight operand become ``mx_matmul``.

Runs when ``ctx.precision`` holds a ``mtia_jax.PrecisionPolicy``; without one
the module is returned unchanged (numerics bit for bit those of ``jax.jit``).

What is a weight: a value that is one of the module's parameters (a program
argument), or is made from one by ops that keep it a weight (``WEIGHT_VIEWS``:
reshape, squeeze, expand_dims, transpose, convert_element_type, copy, slice,
dynamic_slice, stop_gradient, and all_gather of a sharded weight; the pass
runs after partitioning, so it sees each device's program). Inside control
flow, a region parameter is a weight when the region op feeds it a weight and
the parameter holds the same data on every iteration or a slice of it: a
scan's consts and its ``xs`` (stacked per-layer weights scanned over), a while
loop's body/cond consts, a cond's operands. Loop-carried values are never
weights.

What is rewritten: a floating-point ``dot_general`` with

* no batch dimensions and at least one contracting dimension, one of whose
  operands is a weight: that operand gets its weight format, the other
  ``policy.activations``. When both operands are weights (``x`` and ``W``
  both passed in), the right-hand one is the weight (the ``x @ W``
  convention of jnp and Flax);
* with ``policy.attention``, also every other floating-point ``dot_general``
  with a contracting dimension (both operands activations: attention
  scores and values, batch dimensions allowed): both get
  ``policy.activations``.

The rewrite flattens the operands to ``(M, K) @ (K, N)`` (or
``(B, M, K) @ (B, K, N)`` with batch dimensions), inserting a transpose only
where the contracting dimensions are not already innermost (``a``) or
outermost (``b``), and reshapes the result back to the ``dot_general``'s
layout. Several contracting dimensions are flattened into one K, taken in the
weight's axis order (so the weight needs no transpose; the right-hand
operand's order when neither is a weight), and MX blocks run along that K.
The result keeps the ``dot_general``'s dtype (``out_dtype``), accumulated in
float32.

The kernels MTIA runs whole get formats instead of a rewrite (the
primitive's params; its reference rounds the operands, its cost rule reads
them packed at the format's rate): ``swiglu`` whose two weights are
weights (``x_format`` = activations, ``w_format`` = the weights' format, or
a tuple of one format per weight when rules give them different ones),
``moe_ffn`` and the expert-parallel ``moe_experts`` whose expert weights
are weights (likewise),
and every ``flash_attention`` and ``paged_attention`` primitive under
``policy.kv_cache`` (``kv_format``: the keys and values, or the KV pools,
blocks along the head dimension).

Left unchanged: integer or mixed-kind products, products with batch
dimensions (a batched weight, as in an MoE expert einsum, or attention
against a KV cache passed as an argument) unless ``policy.attention``,
products with no contracting dimension (outer products) or a zero-sized
dimension, and ops with regions other than control flow (a
``flash_attention`` op from the attention pass, fused kernels): their bodies
are kept as they are. A policy that gives no operand a format changes
nothing.

On a mesh, the rewrite quantizes each device's operands: the same blocks as
the unsharded program only if every device's K is a whole number of the
global K's blocks. The partition pass, which runs first, asks
``split_keeps_mx_blocks`` before it splits a contraction that this pass may
quantize, and gathers K when the split would cut a block, so the per-device
program quantizes exactly the unsharded program's blocks (and sums the
per-device partial products in another order: float32 reassociation only).
It also adds up partial sums before they reach such a contraction
(quantization is not linear).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowering.ir import Module, Op, Value
from mtia_jax.mx import DEFAULT_BLOCK_SIZE
from mtia_jax.precision import PrecisionPolicy
from mtia_jax.primitives.mx_matmul import mx_matmul_p

# ops whose result i is a weight when their operand i is one (an all_gather
# from the partition pass reassembles a sharded weight)
WEIGHT_VIEWS = frozenset({
    "reshape", "squeeze", "expand_dims", "transpose", "convert_element_type", "copy",
    "slice", "dynamic_slice", "stop_gradient", "all_gather",
})


def run(module: Module, ctx=None) -> Module:
    policy = getattr(ctx, "precision", None)
    if policy is None or not (policy.changes_matmuls or policy.kv_cache is not None):
        return module
    return _rewrite(module, _input_names(module, ctx), policy)


def _input_names(module: Module, ctx) -> dict[Value, tuple[str, ...]]:
    """Each parameter of the program -> the names its rules match
    (``ctx.param_names``; by position, ``"0"``, ``"1"``, ... when unknown)."""
    names = getattr(ctx, "param_names", None)
    if names is None:
        names = [(str(i),) for i in range(len(module.params))]
    if len(names) != len(module.params):
        raise ValueError(f"precision pass: {len(names)} parameter names for a program of "
                         f"{len(module.params)} parameters")
    return dict(zip(module.params, (tuple(n) for n in names)))


def weight_names(module: Module, ctx=None) -> set[tuple[str, ...]]:
    """The names (``ctx.param_names`` entries) of the program parameters that
    this pass would give a weight format: those some rewritten ``dot_general``
    or kernel reads as its weight operand. ``module`` is the program as the
    pass receives it (after the passes before it in the pipeline)."""
    found: set[tuple[str, ...]] = set()
    _rewrite(module, _input_names(module, ctx), PrecisionPolicy(weights="mx8"), found)
    return found


# ------------------------------------------------------------ weights through regions

def _scan_weights(op: Op, name: str, weights) -> list[Value | None]:
    n_consts, n_carry = op.params["num_consts"], op.params["num_carry"]
    return [v if v in weights and not n_consts <= i < n_consts + n_carry else None
            for i, v in enumerate(op.operands)]


def _while_weights(op: Op, name: str, weights) -> list[Value | None]:
    n_cond, n_body = op.params["cond_nconsts"], op.params["body_nconsts"]
    consts = op.operands[:n_cond] if name == "cond" else op.operands[n_cond:n_cond + n_body]
    carry = len(op.operands) - n_cond - n_body
    return [v if v in weights else None for v in consts] + [None] * carry


def _cond_weights(op: Op, name: str, weights) -> list[Value | None]:
    return [v if v in weights else None for v in op.operands[1:]]


# region-op kind -> for each parameter of region ``name``, the operand (a
# weight) it holds the data or a slice of on every iteration, or None
REGION_WEIGHTS = {"scan": _scan_weights, "while": _while_weights, "cond": _cond_weights}


def _region_weights(op: Op, name: str, weights: dict) -> dict[Value, tuple[str, ...]]:
    region = op.regions[name]
    sources = REGION_WEIGHTS[op.kind](op, name, weights)
    return {p: weights[v] for p, v in zip(region.params, sources, strict=True) if v is not None}


# ------------------------------------------------------------ the rewrite

def _rewrite(module: Module, weights: dict[Value, tuple[str, ...]], policy,
             found: set | None = None) -> Module:
    """``module`` with its matmuls rewritten; ``weights`` maps each weight
    value to the names of the program parameter it comes from. The names of
    weights given a format are added to ``found``, if given."""
    weights = dict(weights)
    rename: dict[Value, Value] = {}
    ops: list[Op] = []
    for op in module.ops:
        if any(v in rename for v in op.operands):
            op = dataclasses.replace(op, operands=[rename.get(v, v) for v in op.operands])
        if op.regions:
            if op.kind in REGION_WEIGHTS:  # control flow; other bodies are left alone
                op = dataclasses.replace(op, regions={
                    name: _rewrite(region, _region_weights(op, name, weights), policy, found)
                    for name, region in op.regions.items()})
        elif op.kind in WEIGHT_VIEWS:  # result i from operand i (a combined all_gather has several)
            weights.update((r, weights[v]) for v, r in zip(op.operands, op.results) if v in weights)
        elif op.kind == "dot_general":
            formats = _formats(op, weights, policy)
            if formats is not None:
                weight = op.operands[formats[2]]
                if found is not None and weight in weights and formats[formats[2]] is not None:
                    found.add(weights[weight])
                new_ops, result = _mx_ops(op, *formats)
                ops.extend(new_ops)
                rename[op.results[0]] = result
                continue
        elif op.kind in KERNEL_FORMATS and op.primitive is not None:
            params = KERNEL_FORMATS[op.kind](op, weights, policy)
            if params and found is not None and "w_format" in params:
                fmts = params["w_format"]
                operands = op.operands[KERNEL_WEIGHTS[op.kind]]
                found.update(weights[v] for v, f in zip(
                    operands, fmts if isinstance(fmts, tuple) else (fmts,) * len(operands)) if f)
            if params:
                op = dataclasses.replace(op, attrs={**op.attrs, "params": {**op.params, **params}})
        ops.append(op)
    outputs = [rename.get(v, v) for v in module.outputs]
    return Module(module.name, module.params, ops, outputs)


def _weight_formats(weight_operands: slice):
    """Formats for a kernel whose operands ``weight_operands`` are all weights:
    ``x_format`` = the policy's activations, ``w_format`` = the weights'
    format (each weight's by the policy's rules), or a tuple of one format
    per weight operand when they differ."""
    def formats(op: Op, weights: dict, policy) -> dict:
        operands = op.operands[weight_operands]
        if not all(v in weights and _floating(v) for v in operands):
            return {}
        fmts = tuple(policy.weight_format(weights[v]) for v in operands)
        found = {"x_format": policy.activations,
                 "w_format": fmts[0] if len(set(fmts)) == 1 else fmts}
        return {k: v for k, v in found.items() if v is not None}
    return formats


def _kv_formats(op: Op, weights: dict, policy) -> dict:
    return {"kv_format": policy.kv_cache} if policy.kv_cache is not None else {}


# primitive kind -> its weight operands
KERNEL_WEIGHTS = {"swiglu": slice(1, 3), "moe_ffn": slice(2, 5), "moe_experts": slice(1, 4)}

# primitive kind -> the MX params a policy gives it
KERNEL_FORMATS = {
    **{kind: _weight_formats(operands) for kind, operands in KERNEL_WEIGHTS.items()},
    "flash_attention": _kv_formats,
    "paged_attention": _kv_formats,
}


def _floating(v: Value) -> bool:
    dtype = v.type.dtype
    return isinstance(dtype, np.dtype) and jnp.issubdtype(dtype, jnp.floating)


def _formats(op: Op, weights: dict, policy) -> tuple[str | None, str | None, int] | None:
    """(lhs format, rhs format, index of the weight operand, or 1 when neither is
    one) for a ``dot_general`` to rewrite, or None to keep it."""
    lhs, rhs = op.operands
    (lc, _), (lb, _) = op.params["dimension_numbers"]
    if not (_floating(lhs) and _floating(rhs) and _floating(op.results[0])) or not lc:
        return None
    if any(d == 0 for v in (lhs, rhs) for d in v.type.shape):
        return None
    act = policy.activations
    if not lb and rhs in weights:
        formats = (act, policy.weight_format(weights[rhs]), 1)
    elif not lb and lhs in weights:
        formats = (policy.weight_format(weights[lhs]), act, 0)
    elif policy.attention:
        formats = (act, act, 1)
    else:
        return None
    return None if formats[:2] == (None, None) else formats


def may_quantize(op: Op, policy) -> bool:
    """Whether this pass may rewrite the ``dot_general`` ``op`` under
    ``policy``, whichever operands turn out to be weights: the policy has a
    format, the operands and result are floating point, and the op has no
    batch dims unless ``policy.attention``."""
    if policy is None or not policy.changes_matmuls:
        return False
    (_, _), (lb, _) = op.params["dimension_numbers"]
    return (not lb or policy.attention) and all(_floating(v) for v in (*op.operands, *op.results))


def split_keeps_mx_blocks(op: Op, local_lhs_shape: tuple, policy) -> bool:
    """Whether the ``dot_general`` ``op``, with its operands split so that the
    lhs is ``local_lhs_shape`` on every device (contracting dims split alike
    on both sides), quantizes the unsplit op's MX blocks under ``policy``.

    The rewrite flattens the contracting dims into one K, in the weight's
    axis order (either operand's: both orders are checked), and quantizes
    blocks of ``DEFAULT_BLOCK_SIZE`` along it. A device's K is then runs of
    ``local size of the innermost split dim x the sizes inside it``
    consecutive global elements, each starting at a multiple of its length:
    whole global blocks exactly when that run is a multiple of the block
    size. True as well for ops this pass leaves alone (``may_quantize``)."""
    if not may_quantize(op, policy):
        return True
    dims = op.params["dimension_numbers"]
    shape = op.operands[0].type.shape
    for weight_side in (0, 1):
        (order, _), _ = _contraction_order(dims, weight_side)
        split = [k for k, d in enumerate(order) if local_lhs_shape[d] != shape[d]]
        if split:
            inner = order[split[-1]]
            run = local_lhs_shape[inner] * math.prod(shape[d] for d in order[split[-1] + 1:])
            if run % DEFAULT_BLOCK_SIZE:
                return False
    return True


def _contraction_order(dimension_numbers, weight_side: int):
    """The dimension numbers with the contracting pairs in the weight's axis
    order, so that flattening them into one K does not transpose the weight."""
    (lc, rc), batch = dimension_numbers
    pairs = sorted(zip(lc, rc), key=lambda pair: pair[weight_side])
    return (tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)), batch


def _mx_dot(lhs, rhs, *, dimension_numbers, a_format, b_format, out_dtype):
    """``dot_general(lhs, rhs)`` as one ``mx_matmul`` between transposes/reshapes."""
    (lc, rc), (lb, rb) = dimension_numbers
    lf = [d for d in range(lhs.ndim) if d not in (*lc, *lb)]
    rf = [d for d in range(rhs.ndim) if d not in (*rc, *rb)]
    size = lambda x, dims: math.prod(x.shape[d] for d in dims)
    batch = (size(lhs, lb),) if lb else ()
    a = _layout(lhs, (*lb, *lf, *lc), (*batch, size(lhs, lf), size(lhs, lc)))
    b = _layout(rhs, (*rb, *rc, *rf), (*batch, size(rhs, rc), size(rhs, rf)))
    out = mx_matmul_p.bind(a, b, a_format=a_format, b_format=b_format, a_packed=False,
                           b_packed=False, block_size=DEFAULT_BLOCK_SIZE, out_dtype=np.dtype(out_dtype))
    shape = (*(lhs.shape[d] for d in lb), *(lhs.shape[d] for d in lf),
             *(rhs.shape[d] for d in rf))
    return out.reshape(shape) if out.shape != shape else out


def _layout(x, perm, shape):
    if tuple(perm) != tuple(range(x.ndim)):
        x = lax.transpose(x, perm)
    return lax.reshape(x, shape) if x.shape != tuple(shape) else x


@functools.lru_cache(maxsize=1024)
def _traced(lhs_type, rhs_type, dimension_numbers, a_format, b_format, out_dtype):
    fn = functools.partial(_mx_dot, dimension_numbers=dimension_numbers, a_format=a_format,
                           b_format=b_format, out_dtype=out_dtype)
    return jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(*lhs_type), jax.ShapeDtypeStruct(*rhs_type))


def _mx_ops(op: Op, a_format: str | None, b_format: str | None,
            weight_side: int) -> tuple[list[Op], Value]:
    """The ops replacing ``op``, and the value that replaces its result."""
    from lowering.from_jaxpr import Builder  # the importer builds the new ops from a trace

    lhs, rhs = op.operands
    dims = tuple(tuple(tuple(int(d) for d in dims) for dims in pair)
                 for pair in op.params["dimension_numbers"])
    dims = _contraction_order(dims, weight_side)
    closed = _traced((lhs.type.shape, lhs.type.dtype), (rhs.type.shape, rhs.type.dtype), dims,
                     a_format, b_format, np.dtype(op.results[0].type.dtype))
    builder = Builder()
    builder.current_source = op.source
    (result,) = builder.import_jaxpr(closed.jaxpr, closed.consts, [lhs, rhs])
    for new in builder.ops:
        new.source = op.source
    return builder.ops, result


