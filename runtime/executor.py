"""Host numerics: run an MTIA IR module for real on the host through XLA.

The module is re-emitted as a JAX function (each generic op binds its JAX
primitive; MTIA-specific ops run their reference implementation). Graph mode
``jax.jit``s that function once, so calls cost what ``jax.jit`` costs. Eager
mode dispatches kernel by kernel, for debugging.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from lowering.ir import Module, Op, Value

EmitRule = Callable[[Op, list[Any]], list[Any]]


def _emit_generic(op: Op, args: list[Any]) -> list[Any]:
    out = op.primitive.bind(*args, **op.params)
    return list(out) if op.primitive.multiple_results else [out]


def _emit_constant(op: Op, args: list[Any]) -> list[Any]:
    return [op.attrs["value"]]


# op kind -> how to compute it on the host; kinds not listed are generic ops
EMIT_RULES: dict[str, EmitRule] = {
    "constant": _emit_constant,
}


def emit_op(op: Op, args: list[Any]) -> list[Any]:
    return EMIT_RULES.get(op.kind, _emit_generic)(op, args)


def host_function(module: Module) -> Callable[..., list[Any]]:
    """A JAX function computing ``module``'s outputs from its flat inputs."""

    def run(*flat_args):
        env: dict[Value, Any] = dict(zip(module.params, flat_args, strict=True))
        for op in module.ops:
            outs = emit_op(op, [env[v] for v in op.operands])
            env.update(zip(op.results, outs, strict=True))
        return [env[v] for v in module.outputs]

    run.__name__ = module.name
    return run


class GraphExecutor:
    """One XLA program for the whole module, compiled on first call."""

    def __init__(self, module: Module, donate_argnums: Sequence[int] = ()):
        self._fn = jax.jit(host_function(module), donate_argnums=tuple(donate_argnums))

    def __call__(self, *flat_args) -> list[Any]:
        return self._fn(*flat_args)


class EagerExecutor:
    """One host dispatch per kernel (each primitive runs as its own XLA
    computation), for debugging and per-kernel inspection."""

    def __init__(self, module: Module, donate_argnums: Sequence[int] = ()):
        self._run = host_function(module)

    def __call__(self, *flat_args) -> list[Any]:
        return [jax.numpy.asarray(out) for out in self._run(*flat_args)]


EXECUTORS = {"graph": GraphExecutor, "eager": EagerExecutor}
