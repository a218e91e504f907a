"""Fusion: group ops into ``fused_kernel`` ops that run as one kernel.

Three patterns, grown greedily in program order:

- elementwise chains (elementwise and transcendental ops, views, broadcasts);
- producers into reductions: an elementwise group feeding a reduction becomes
  one reduction kernel (the normalisation in norms and softmax);
- epilogues into matmuls: elementwise consumers of a contraction's result
  (bias, activation, scaling) join the contraction's kernel (``dot_general``,
  ``mx_matmul`` and ``swiglu`` alike).

Scalar arithmetic (``lowering.kernels.is_scalar``) joins no group: it
computes kernel arguments outside kernels.

A ``fused_kernel`` op's operands are the group's external inputs and its
results the values used outside the group; its ``body`` region holds the
original ops in order, so host numerics are unchanged. The cost model charges
HBM traffic only for the operands and results.

Broadcasts and iotas of values from outside a group are *generators*: they
are recomputed inside every group that reads them instead of being written
to HBM (XLA does the same).

A group stops growing once a value it produced is read by an op outside it,
and an op joins a group only if none of its other operands depends on that
group, so the fused program stays in dependency order. Elementwise ops at the
end of a group that only widen values the group writes anyway (a convert to
float32) leave it again, to be recomputed by their readers (``prologue``).
"""

from __future__ import annotations

import dataclasses
import itertools

from lowering.ir import Module, Op, Value
from lowering.kernels import is_scalar
from lowering.op_kinds import KIND_CATEGORY
from lowering.passes import dce
from lowering.regions import REGION_KINDS

# what an op contributes to a kernel
ROLE_BY_CATEGORY = {
    "elementwise": "elementwise",
    "transcendental": "elementwise",
    "view": "elementwise",
    "reduction": "reduction",
    "contraction": "matmul",
}
# mtia-jax's matmul kernels take epilogues like dot_general
ROLE_BY_KIND = {"broadcast_in_dim": "elementwise", "iota": "elementwise",
                "mx_matmul": "matmul", "swiglu": "matmul"}
GENERATORS = frozenset({"broadcast_in_dim", "iota"})

# (group pattern, role of the joining op) -> the group's new pattern
JOIN = {
    ("elementwise", "elementwise"): "elementwise",
    ("matmul", "elementwise"): "matmul",
    ("elementwise", "reduction"): "reduction",
}


def _role(op: Op) -> str | None:
    if op.regions or is_scalar(op):  # scalar arithmetic runs outside kernels
        return None
    return ROLE_BY_KIND.get(op.kind) or ROLE_BY_CATEGORY.get(KIND_CATEGORY.get(op.kind, ""))


@dataclasses.dataclass(eq=False)
class _Group:
    id: int
    pattern: str
    ops: list[Op]
    last: int
    values: set[Value]
    sealed: bool = False
    deps: set[int] = dataclasses.field(default_factory=set)


class _Fuser:
    def __init__(self, module: Module):
        self.module = module
        self.ids = itertools.count()
        self.group_of: dict[Value, _Group] = {}   # value -> group producing it
        self.groups: list[_Group] = []
        self.generator_of: dict[Value, Op] = {}  # lazily recomputed generator results

    def _depends_on(self, value: Value, group: _Group) -> bool:
        producer = self.group_of.get(value)
        if producer is None:
            return False
        return producer is group or group.id in producer.deps

    def _try_join(self, op: Op, role: str, index: int) -> _Group | None:
        candidates = {id(g): g for v in op.operands if (g := self.group_of.get(v)) is not None}
        for group in sorted(candidates.values(), key=lambda g: -g.last):
            pattern = JOIN.get((group.pattern, role))
            if pattern is None or group.sealed:
                continue
            others = [v for v in op.operands if self.group_of.get(v) is not group]
            if any(self._depends_on(v, group) for v in others):
                continue
            group.pattern = pattern
            return group
        return None

    def _add(self, group: _Group, op: Op, index: int) -> None:
        for v in op.operands:  # recompute lazy generators inside the group
            gen = self.generator_of.get(v)
            if gen is not None and v not in group.values:
                self._add(group, gen, index)
        group.ops.append(op)
        group.last = index
        group.values.update(op.results)
        if op.results[0] not in self.generator_of:  # generators belong to no one group
            for r in op.results:
                self.group_of[r] = group

    def _note_external_reads(self, op: Op, reader: _Group | None) -> None:
        for v in op.operands:
            producer = self.group_of.get(v)
            if producer is not None and producer is not reader:
                producer.sealed = True
                if reader is not None:
                    reader.deps |= {producer.id} | producer.deps

    def run(self) -> Module:
        for index, op in enumerate(self.module.ops):
            role = _role(op)
            if role is None:
                self._note_external_reads(op, None)
                continue
            if op.kind in GENERATORS and all(v not in self.group_of for v in op.operands):
                self.generator_of[op.results[0]] = op
                continue
            group = self._try_join(op, role, index)
            if group is None:
                group = _Group(next(self.ids), role, [], index, set())
                self.groups.append(group)
            self._note_external_reads(op, group)
            self._add(group, op, index)
        return self._rebuild()

    def _rebuild(self) -> Module:
        used_outside: dict[_Group, set[Value]] = {g: set() for g in self.groups}
        for g in self.groups:
            for op in g.ops:
                for v in op.operands:
                    producer = self.group_of.get(v)
                    if producer is not None and producer is not g:
                        used_outside[producer].add(v)
        fused_ops = {id(op) for g in self.groups for op in g.ops}
        for op in self.module.ops:
            if id(op) not in fused_ops:
                for v in op.operands:
                    if v in self.group_of:
                        used_outside[self.group_of[v]].add(v)
        for v in self.module.outputs:
            if v in self.group_of:
                used_outside[self.group_of[v]].add(v)

        emit_at = {g.last: g for g in self.groups}
        ops: list[Op] = []
        for index, op in enumerate(self.module.ops):
            if id(op) not in fused_ops or op.kind in GENERATORS and op.results[0] in self.generator_of:
                ops.append(op)
            group = emit_at.get(index)
            if group is not None:
                tails = _widening_tails(group, used_outside[group], set(self.module.outputs))
                ops.append(_fused_op(group, used_outside[group]))
                ops.extend(tails)
        return dce.run(dataclasses.replace(self.module, ops=ops))


def summary(ops) -> str:
    """The ``ops`` attribute of a fused kernel: its ops' kinds, views left out."""
    return "+".join(op.kind for op in ops if KIND_CATEGORY.get(op.kind) != "view")


def _widening_tails(group: _Group, escaping: set[Value], outputs: set[Value]) -> list[Op]:
    """Take out of ``group`` (and return, in order) the elementwise ops at its
    end whose results the group would write and that widen what they read
    (a convert of the group's bf16 result to float32 for a later reduction,
    say): left out, the group writes the narrower operand instead and the
    prologue pass recomputes the widening inside its readers (kernels: a
    program output must be written whole anyway, so it stays).
    ``escaping`` is updated to match."""
    tails: list[Op] = []
    while len(group.ops) > 1:
        op = group.ops[-1]
        newly = [v for v in dict.fromkeys(op.operands) if v in group.values and v not in escaping]
        read = sum(v.type.nbytes for v in dict.fromkeys(op.operands) if v.type.size > 1)
        if (_role(op) != "elementwise" or op.kind in GENERATORS
                or not all(r in escaping and r not in outputs for r in op.results)
                or sum(r.type.nbytes for r in op.results) <= read):
            break
        group.ops.pop()
        group.values.difference_update(op.results)
        escaping.difference_update(op.results)
        escaping.update(newly)
        tails.insert(0, op)
    return tails


def _fused_op(group: _Group, escaping: set[Value]) -> Op:
    if len(group.ops) == 1:
        return group.ops[0]
    inputs = list(dict.fromkeys(v for op in group.ops for v in op.operands if v not in group.values))
    outputs = [r for op in group.ops for r in op.results if r in escaping]
    body = Module(f"fused_{group.pattern}", inputs, list(group.ops), outputs)
    return Op("fused_kernel", inputs, outputs, {"pattern": group.pattern, "ops": summary(group.ops)},
              group.ops[-1].source, regions={"body": body})


def fuse(module: Module) -> Module:
    # control-flow bodies are programs of their own; the body of an op the
    # compiler recognised (flash_attention) stays as matched
    module = dataclasses.replace(module, ops=[
        dataclasses.replace(op, regions={k: fuse(r) for k, r in op.regions.items()})
        if op.kind in REGION_KINDS else op for op in module.ops])
    return _Fuser(module).run()


def run(module: Module, ctx=None) -> Module:
    return fuse(module)
