"""In-place updates: which updates write into their operand's buffer.

An update op (``dynamic_update_slice``, ``scatter`` and its combining
variants) produces its operand with some rows replaced. Like XLA, the chip
writes the new rows into the operand's buffer and moves nothing else, when
that buffer may be overwritten:

- nothing reads the old value afterwards: no later op of the same function
  reads the operand or a view of it (``lowering.kernels``), and it is not an
  output of the function;
- the buffer is not the caller's: a parameter of the program is overwritten
  only if it was donated (``donate_argnums``); inside a loop body only the
  loop-carried state belongs to the loop (a scan's consts and ``xs`` slices
  and a while loop's consts are the caller's).

Otherwise the update copies its operand first (its cost rule charges the
copy). The decision is the op's ``in_place`` attribute, shown by
``as_text()``.

A loop whose body updates its carried state in place needs that state in a
buffer of its own: when the loop's initial value may not be overwritten (by
the rules above, one level out), the loop copies it once before the first
trip. The region op lists those carries in ``copied_carries`` (indices into
its operands); the cost model charges the copy.

Pattern: a KV cache carried through a scan over layers and updated with one
row per sequence (``cache.at[layer, batch, pos].set(k)``) moves one row per
sequence per layer when the cache is donated, and the whole cache once more
when it is not.
"""

from __future__ import annotations

import dataclasses

from lowering.ir import Module, Op, Value
from lowering.kernels import is_view

UPDATE_KINDS = frozenset({
    "dynamic_update_slice", "scatter", "scatter-add", "scatter-sub", "scatter-mul",
    "scatter-min", "scatter-max",
})


def _scan_carries(op: Op) -> range:
    start = op.params["num_consts"]
    return range(start, start + op.params["num_carry"])


def _while_carries(op: Op) -> range:
    start = op.params["cond_nconsts"] + op.params["body_nconsts"]
    return range(start, len(op.operands))


# region-op kind -> (operand indices of the loop-carried state, the body
# region and the offset of those carries among its parameters)
LOOP_CARRIES = {
    "scan": lambda op: (_scan_carries(op), "body", op.params["num_consts"]),
    "while": lambda op: (_while_carries(op), "body", op.params["body_nconsts"]),
}


def run(module: Module, ctx=None) -> Module:
    donated = getattr(ctx, "donated", None) or frozenset()
    owned = {p for i, p in enumerate(module.params) if i in donated}
    module, _ = _plan(module, owned)
    return module


def _plan(module: Module, owned: set[Value]) -> tuple[Module, set[Value]]:
    """``module`` with its updates decided, and the parameters of ``owned``
    it updates in place (directly or through a loop)."""
    base: dict[Value, Value] = {}     # value -> the value it is a view of
    for op in module.ops:
        if is_view(op) and op.operands:
            for r in op.results:
                base[r] = base.get(op.operands[0], op.operands[0])
    last_read: dict[Value, int] = {}  # value -> index of the last op reading it or a view of it
    for index, op in enumerate(module.ops):
        for v in op.operands:
            last_read[base.get(v, v)] = index
    returned = {base.get(v, v) for v in module.outputs}
    buffer: dict[Value, Value] = {}   # value -> the value whose buffer it was written into

    def root(v: Value) -> Value:
        v = base.get(v, v)
        return buffer.get(v, v)

    def reusable(v: Value, index: int) -> bool:
        """May ``v``'s buffer be overwritten by op ``index``?"""
        b = base.get(v, v)
        return (last_read.get(b, -1) <= index and b not in returned
                and (root(v) not in module.params or root(v) in owned))

    updated: set[Value] = set()
    ops = []
    for index, op in enumerate(module.ops):
        if op.kind in UPDATE_KINDS:
            in_place = reusable(op.operands[0], index)
            op = dataclasses.replace(op, attrs={**op.attrs, "in_place": in_place})
            if in_place:
                buffer[op.results[0]] = root(op.operands[0])
                updated.add(root(op.operands[0]))
        elif op.kind == "fused_kernel":
            op = _fused(op, index, reusable, root, buffer, updated)
        elif op.kind in LOOP_CARRIES:
            op, carried = _loop(op, index, reusable, root)
            buffer.update(carried)
            updated.update(carried.values())
        elif op.regions:  # cond: its branches see the caller's operands
            op = dataclasses.replace(op, regions={name: _plan(r, set())[0]
                                                  for name, r in op.regions.items()})
        ops.append(op)
    return dataclasses.replace(module, ops=ops), updated & set(module.params)


def _fused(op: Op, index: int, reusable, root, buffer: dict, updated: set) -> Op:
    """A fused kernel whose body updates one of its operands (a KV-cache
    write with the rotary embedding as its prologue, say): the update is
    decided on the kernel's operand."""
    body = op.regions["body"]
    outer = dict(zip(body.params, op.operands))
    ops, any_in_place = [], False
    for inner in body.ops:
        if inner.kind in UPDATE_KINDS:
            target = outer.get(inner.operands[0])
            in_place = target is not None and reusable(target, index)
            inner = dataclasses.replace(inner, attrs={**inner.attrs, "in_place": in_place})
            if in_place:
                any_in_place = True
                updated.add(root(target))
                outer[inner.results[0]] = target  # a later update of it updates the same buffer
                for result, out in zip(op.results, body.outputs):
                    if out is inner.results[0]:
                        buffer[result] = root(target)
        ops.append(inner)
    if not any(inner.kind in UPDATE_KINDS for inner in ops):
        return op
    return dataclasses.replace(op, regions={**op.regions, "body": dataclasses.replace(body, ops=ops)},
                               attrs={**op.attrs, "in_place": any_in_place})


def _loop(op: Op, index: int, reusable, root) -> tuple[Op, dict[Value, Value]]:
    """The loop with its regions decided and the carries it copies, and
    {loop result: buffer} for the carries it updates in its initial value's buffer."""
    carries, region, offset = LOOP_CARRIES[op.kind](op)
    body = op.regions[region]
    carry_params = [body.params[offset + k] for k in range(len(carries))]
    regions = {name: _plan(r, set(carry_params) if name == region else set())
               for name, r in op.regions.items()}
    written = regions[region][1]
    copied, carried = [], {}
    for k, operand_index in enumerate(carries):
        if carry_params[k] not in written:
            continue
        init = op.operands[operand_index]
        if reusable(init, index):
            carried[op.results[k]] = root(init)
        else:
            copied.append(operand_index)
    attrs = {**op.attrs, "copied_carries": tuple(copied)} if copied else op.attrs
    return dataclasses.replace(op, regions={n: r for n, (r, _) in regions.items()}, attrs=attrs), carried
