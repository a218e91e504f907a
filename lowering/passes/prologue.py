"""Prologue fusion: cheap producers are recomputed inside the kernels that read them.

After ``fusion`` has grown its groups, many small kernels are left whose
results only feed one or a few other kernels: a norm before the matmuls of
the query, key and value projections, the index arithmetic in front of a
gather or a scatter, the slices and concatenation of a rotary embedding in
front of the attention or the KV-cache write, a dequantization in front of
a matmul. Each costs a launch, a write of its result and a read back. This
pass moves such a *producer* into each of its *consumers* (XLA does the
same with cheap producers of fusions), so the consumer reads the producer's
inputs instead of its result.

A producer qualifies when

- it is cheap to recompute: an elementwise or data-movement op (converts,
  broadcasts, iotas, slices, pads, concatenations, transposes), a fused
  elementwise kernel, or a norm (``rms_norm``, ``layer_norm``: a row
  reduction the consumer does on the rows it loads);
- every reader of its results is a kernel that takes prologues (any kernel
  but a region op, a collective, a host fallback, a view or a user's Pallas
  kernel, whose operands are the blocks it was written for), at most
  ``MAX_CONSUMERS`` of them, and none is a program output;
- recomputing does not move more bytes: ``n`` consumers reading the
  producer's inputs cost no more than writing its results once and reading
  them back ``n`` times.

Each consumer becomes (or stays) a ``fused_kernel`` whose body holds the
producer's ops and then its own, in dependency order, and whose pattern is
the consumer's; host numerics are unchanged (the same ops run). Fusion
repeats until no producer qualifies, so chains of producers fold in.
"""

from __future__ import annotations

import dataclasses

from lowering.ir import Module, Op, Value
from lowering.op_kinds import KIND_CATEGORY
from lowering.passes import dce
from lowering.passes.fusion import summary
from lowering.regions import REGION_KINDS
from lowering.kernels import is_scalar, is_view

MAX_CONSUMERS = 4
PRODUCER_CATEGORIES = frozenset({"elementwise", "transcendental", "data_movement"})
PRODUCER_KINDS = frozenset({"rms_norm", "layer_norm"})
# kernels that take no prologue: they run elsewhere than the PE grid, or are not kernels
NO_PROLOGUE_CATEGORIES = frozenset({"collective", "host", "view", "constant"})
# kernels written by the user (a Pallas kernel: its blocks are its operands, as written)
NO_PROLOGUE_KINDS = frozenset({"pallas_call"})


def _is_producer(op: Op) -> bool:
    if op.kind in REGION_KINDS or is_view(op) or is_scalar(op):
        return False
    if op.kind == "fused_kernel":
        return op.attrs.get("pattern") == "elementwise"
    return op.kind in PRODUCER_KINDS or KIND_CATEGORY.get(op.kind) in PRODUCER_CATEGORIES


def _takes_prologue(op: Op) -> bool:
    if op.kind in REGION_KINDS or op.kind in NO_PROLOGUE_KINDS or is_view(op) or is_scalar(op):
        return False
    return op.kind == "fused_kernel" or KIND_CATEGORY.get(op.kind) not in NO_PROLOGUE_CATEGORIES


def _nbytes(values) -> int:
    return sum(v.type.nbytes for v in values if v.type.size > 1)


def _body_ops(op: Op) -> list[Op]:
    return list(op.regions["body"].ops) if op.kind == "fused_kernel" else [op]


def _pattern(op: Op) -> str:
    if op.kind == "fused_kernel":
        return op.attrs["pattern"]
    return {"contraction": "matmul", "reduction": "reduction"}.get(KIND_CATEGORY.get(op.kind, ""),
                                                                    op.kind)


def _merge(producer: Op, views: list[Op], consumer: Op) -> Op:
    """``consumer`` with ``producer``'s ops (and the views between them) in
    front, as one fused kernel."""
    made = {r for op in (producer, *views) for r in op.results}
    inputs = list(dict.fromkeys([*producer.operands,
                                 *(v for v in consumer.operands if v not in made)]))
    ops = [o for op in (producer, *views) for o in _body_ops(op)] + _body_ops(consumer)
    body = Module(f"fused_{_pattern(consumer)}", inputs, ops, list(consumer.results))
    attrs = {k: v for k, v in consumer.attrs.items() if k not in ("primitive", "params")} \
        if consumer.kind == "fused_kernel" else {}
    attrs.update(pattern=_pattern(consumer), ops=summary(ops))
    return Op("fused_kernel", inputs, list(consumer.results), attrs, consumer.source,
              regions={"body": body})


def _fuse(module: Module) -> Module:
    """Fuse every qualifying producer, last first, so that a chain of
    producers folds into the kernel at its end in one sweep."""
    ops: list[Op | None] = list(module.ops)
    readers: dict[Value, set[int]] = {}
    for index, op in enumerate(ops):
        for v in op.operands:
            readers.setdefault(v, set()).add(index)
    outputs = set(module.outputs)

    def readers_through_views(op: Op) -> tuple[list[int], list[int]] | None:
        """(the kernels reading ``op``'s results, directly or through views;
        those views), or None if a result or a view of it is a program output."""
        consumers, views, frontier = set(), [], list(op.results)
        while frontier:
            v = frontier.pop()
            if v in outputs:
                return None
            for i in readers.get(v, ()):
                if is_view(ops[i]):
                    views.append(i)
                    frontier.extend(ops[i].results)
                else:
                    consumers.add(i)
        return sorted(consumers), sorted(set(views))

    for index in range(len(ops) - 1, -1, -1):
        op = ops[index]
        found = readers_through_views(op) if _is_producer(op) else None
        if found is None:
            continue
        consumers, views = found
        n = len(consumers)
        if not consumers or n > MAX_CONSUMERS or not all(_takes_prologue(ops[i]) for i in consumers):
            continue
        if n * _nbytes(op.operands) > _nbytes(op.operands) + (1 + n) * _nbytes(op.results):
            continue
        for i in consumers:  # views a consumer does not read are dropped with the dead code
            ops[i] = _merge(op, [ops[j] for j in views], ops[i])
        for v in op.operands:
            readers[v].discard(index)
            readers[v].update(consumers)
        for j in (index, *views):
            ops[j] = None
    return dataclasses.replace(module, ops=[op for op in ops if op is not None])


def fuse_prologues(module: Module) -> Module:
    module = dataclasses.replace(module, ops=[
        dataclasses.replace(op, regions={k: fuse_prologues(r) for k, r in op.regions.items()})
        if op.kind in REGION_KINDS else op for op in module.ops])
    return dce.run(_fuse(module))


def run(module: Module, ctx=None) -> Module:
    return fuse_prologues(module)
