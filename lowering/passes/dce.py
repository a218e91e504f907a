"""Dead-code elimination: drop ops none of whose results are used (ops with
effects, such as ``jax.debug.print``, are always kept)."""

from __future__ import annotations

import dataclasses

from lowering.ir import Module


def run(module: Module, ctx=None) -> Module:
    live = set(module.outputs)
    kept = []
    for op in reversed(module.ops):
        if any(r in live for r in op.results) or op.attrs.get("effects"):
            if op.regions:
                op = dataclasses.replace(op, regions={k: run(r, ctx) for k, r in op.regions.items()})
            kept.append(op)
            live.update(op.operands)
    kept.reverse()
    return dataclasses.replace(module, ops=kept)
