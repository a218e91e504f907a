"""Host numerics: run an MTIA IR module for real on the host through XLA.

The module is re-emitted as a JAX function (each generic op binds its JAX
primitive; region ops become ``lax.scan`` / ``lax.while_loop`` /
``lax.switch`` over their re-emitted bodies). Graph mode ``jax.jit``s that
function once, so calls cost what ``jax.jit`` costs. Eager mode dispatches
kernel by kernel, for debugging.

Every ``while`` op gets a trip counter in the emitted program: the host
function returns, next to the outputs, the total number of body executions of
each while loop (keyed by its path, e.g. ``"4"`` or ``"2/body/7"``), so the
modeled time of data-dependent loops uses the real count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lowering.ir import Module, Op, Value
from mtia_jax import config
from runtime import spmd
from runtime.gc_pause import without_gc_pauses
from lowering.kernels import is_scalar
from runtime.cost_model import is_kernel

Counts = dict[str, Any]  # while-op path -> int32 total trips
EmitRule = Callable[[Op, list[Any]], list[Any]]
RegionEmitRule = Callable[[Op, list[Any], str], tuple[list[Any], Counts]]


def _emit_generic(op: Op, args: list[Any]) -> list[Any]:
    out = op.primitive.bind(*args, **op.params)
    return list(out) if op.primitive.multiple_results else [out]


def _emit_constant(op: Op, args: list[Any]) -> list[Any]:
    return [op.attrs["value"]]


# Collectives run as JAX's own collectives over named axes: under
# ``jax.vmap(axis_name=...)`` on one host device, or ``shard_map`` on a real
# mesh. A collective may carry several operands (``lowering.passes.
# combine_collectives``): result i is the collective of operand i.
_REDUCERS = {"sum": lax.psum, "max": lax.pmax, "min": lax.pmin}


def _axes(op: Op) -> tuple[str, ...]:
    """The mesh axes a collective runs over (several: a dim split over their
    product, the first axis major)."""
    return op.attrs.get("axes") or (op.attrs["axis"],)


def _each(emit_one: Callable[[Op, Any], Any]) -> EmitRule:
    """The rule of a collective from that of one of its operands."""
    return lambda op, args: [emit_one(op, x) for x in args]


def _emit_shard_slice(op: Op, args: list[Any]) -> list[Any]:
    (x,), dim = args, op.attrs["dim"]
    chunk = x.shape[dim] // op.attrs["group"]
    return [lax.dynamic_slice_in_dim(x, lax.axis_index(_axes(op)) * chunk, chunk, dim)]


def _all_gather(op: Op, x: Any) -> Any:
    for axis in reversed(_axes(op)):  # minor axis first: blocks come together major to minor
        x = lax.all_gather(x, axis, axis=op.attrs["dim"], tiled=True)
    return x


def _reduce_scatter(op: Op, x: Any) -> Any:
    for axis in _axes(op):  # major axis first
        x = lax.psum_scatter(x, axis, scatter_dimension=op.attrs["dim"], tiled=True)
    return x


# op kind -> how to compute it on the host; kinds not listed are generic ops
EMIT_RULES: dict[str, EmitRule] = {
    "constant": _emit_constant,
    "all_reduce": _each(lambda op, x: _REDUCERS[op.attrs["reduce"]](x, op.attrs["axes"])),
    "all_gather": _each(_all_gather),
    "reduce_scatter": _each(_reduce_scatter),
    "all_to_all": _each(lambda op, x: lax.all_to_all(x, op.attrs["axis"], op.attrs["split"],
                                                     op.attrs["concat"], tiled=True)),
    "permute": _each(lambda op, x: lax.ppermute(x, op.attrs["axis"], op.attrs["perm"])),
    "axis_index": lambda op, a: [lax.axis_index(op.attrs["axis"])],
    "shard_slice": _emit_shard_slice,
    "sharding_constraint": lambda op, a: list(a),
}


def emit_op(op: Op, args: list[Any]) -> list[Any]:
    return EMIT_RULES.get(op.kind, _emit_generic)(op, args)


# ------------------------------------------------------------ region ops

def counted_loops(module: Module, path: str = "") -> list[str]:
    """Paths of the while ops whose trip counts the host program returns.

    Loops nested in a while's condition are not counted (a condition cannot
    carry state); the cost model assumes one trip per execution for them.
    """
    paths = []
    for i, op in enumerate(module.ops):
        here = f"{path}{i}"
        if op.kind == "while":
            paths.append(here)
        for name, region in op.regions.items():
            if not (op.kind == "while" and name == "cond"):
                paths.extend(counted_loops(region, f"{here}/{name}/"))
    return paths


def _zeros(paths: Sequence[str]) -> Counts:
    return {p: jnp.zeros((), jnp.int32) for p in paths}


def _add(total: Counts, more: Counts) -> Counts:
    return {p: total[p] + more.get(p, 0) for p in total}


def _emit_scan(op: Op, args: list[Any], path: str) -> tuple[list[Any], Counts]:
    params = op.params
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, init, xs = args[:n_consts], args[n_consts:n_consts + n_carry], args[n_consts + n_carry:]
    body_path = f"{path}/body/"
    body = host_function(op.regions["body"], body_path)
    loops = counted_loops(op.regions["body"], body_path)

    def step(carry, x):
        counts, values = carry
        outs, inner = body(*consts, *values, *x)
        return (_add(counts, inner), outs[:n_carry]), outs[n_carry:]

    (counts, carry), ys = lax.scan(step, (_zeros(loops), list(init)), list(xs),
                                   length=params["length"], reverse=params["reverse"],
                                   unroll=params["unroll"])
    return [*carry, *ys], counts


def _emit_while(op: Op, args: list[Any], path: str) -> tuple[list[Any], Counts]:
    params = op.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, init = args[:n_cond], args[n_cond:n_cond + n_body], args[n_cond + n_body:]
    cond = host_function(op.regions["cond"], f"{path}/cond/")
    body_path = f"{path}/body/"
    body = host_function(op.regions["body"], body_path)
    loops = counted_loops(op.regions["body"], body_path)

    def keep_going(state):
        _, _, values = state
        # a predicate batched by vmap (one per example) runs while any is true,
        # as the while primitive does
        return jnp.any(cond(*cond_consts, *values)[0][0])

    batched = bool(op.regions["cond"].outputs[0].type.shape)

    def iterate(state):
        trips, counts, values = state
        outs, inner = body(*body_consts, *values)
        if batched:  # an example whose predicate is false keeps its values
            (pred,), _ = cond(*cond_consts, *values)
            outs = [jnp.where(pred.reshape(pred.shape + (1,) * (o.ndim - pred.ndim)), o, v)
                    for o, v in zip(outs, values)]
        return trips + 1, _add(counts, inner), outs

    trips, counts, carry = lax.while_loop(
        keep_going, iterate, (jnp.zeros((), jnp.int32), _zeros(loops), list(init)))
    return carry, {**counts, path: trips}


def _emit_cond(op: Op, args: list[Any], path: str) -> tuple[list[Any], Counts]:
    index, operands = args[0], args[1:]
    names = sorted(op.regions, key=lambda n: int(n.removeprefix("branch")))
    loops = [p for n in names for p in counted_loops(op.regions[n], f"{path}/{n}/")]

    def branch(name):
        fn = host_function(op.regions[name], f"{path}/{name}/")

        def run(*xs):
            outs, inner = fn(*xs)
            return outs, _add(_zeros(loops), inner)
        return run

    outs, counts = lax.switch(index, [branch(n) for n in names], *operands)
    return list(outs), counts


def _emit_body(op: Op, args: list[Any], path: str) -> tuple[list[Any], Counts]:
    # An op computed by its ``body`` region: a fused kernel, or a pattern the
    # compiler recognised (jnp attention as flash_attention). The body's ops
    # run in order inside the one host program, so numerics are unchanged.
    return host_function(op.regions["body"], f"{path}/body/")(*args)


# control-flow region ops; any other op with regions is computed by its "body"
REGION_EMIT_RULES: dict[str, RegionEmitRule] = {
    "scan": _emit_scan,
    "while": _emit_while,
    "cond": _emit_cond,
}
CONTROL_FLOW = frozenset(REGION_EMIT_RULES)


# ------------------------------------------------------------ functions

def host_function(module: Module, path: str = "") -> Callable[..., tuple[list[Any], Counts]]:
    """A JAX function: flat inputs -> (outputs, while-loop trip counts)."""

    @without_gc_pauses  # runs when the host program is traced
    def run(*flat_args):
        env: dict[Value, Any] = dict(zip(module.params, flat_args, strict=True))
        counts: Counts = {}
        for i, op in enumerate(module.ops):
            args = [env[v] for v in op.operands]
            if op.regions:  # control flow, or an op computed by its body (a fused kernel)
                outs, inner = REGION_EMIT_RULES.get(op.kind, _emit_body)(op, args, f"{path}{i}")
                counts.update(inner)
            else:
                outs = emit_op(op, args)
            env.update(zip(op.results, outs, strict=True))
        return [env[v] for v in module.outputs], counts

    run.__name__ = module.name
    return run


class GraphExecutor:
    """One XLA program for the whole module, compiled on first call. A
    per-device (partitioned) module runs over its mesh (``runtime.spmd``)."""

    def __init__(self, module: Module, donate_argnums: Sequence[int] = (), numerics: str = "vmap"):
        fn = host_function(module)
        if module.layout is not None:
            fn = spmd.NUMERICS[numerics](module, fn)
        self._fn = jax.jit(fn, donate_argnums=tuple(donate_argnums))

    def __call__(self, *flat_args) -> tuple[list[Any], Counts]:
        return self._fn(*flat_args)


class EagerExecutor:
    """One host dispatch per kernel (each primitive runs as its own XLA
    computation), for debugging and per-kernel inspection.

    With ``mtia_jax.config.debug_nans`` (``debug_infs``) on, every kernel's
    floating-point results are checked as it runs, and the first NaN (Inf)
    raises ``FloatingPointError`` naming the op kind, its path and the user's
    source line. The ops of a fused kernel's body run (and are checked) one by
    one. Kernels inside scan/while/cond bodies run inside one ``lax`` control
    flow dispatch, so there the region op's results are checked instead.
    """

    def __init__(self, module: Module, donate_argnums: Sequence[int] = ()):
        self._module = module

    def __call__(self, *flat_args) -> tuple[list[Any], Counts]:
        outs, counts = self._run(self._module, flat_args, "", self.enabled_checks())
        return [jnp.asarray(out) for out in outs], counts

    def _run(self, module: Module, flat_args: Sequence[Any], path: str,
             checks: tuple[str, ...]) -> tuple[list[Any], Counts]:
        env: dict[Value, Any] = dict(zip(module.params, flat_args, strict=True))
        counts: Counts = {}
        for i, op in enumerate(module.ops):
            here = f"{path}{i}"
            args = [env[v] for v in op.operands]
            if op.regions and op.kind not in CONTROL_FLOW:
                # an op computed by its body, straight through: run and check its ops one by one
                outs, inner = self._run(op.regions["body"], args, f"{here}/body/", checks)
            elif op.regions:
                outs, inner = REGION_EMIT_RULES[op.kind](op, args, here)
                if checks:
                    self._check(op, here, args, outs, checks)
            else:
                outs, inner = emit_op(op, args), {}
                if checks and (is_kernel(op) or is_scalar(op)):
                    self._check(op, here, args, outs, checks)
            counts.update(inner)
            env.update(zip(op.results, outs, strict=True))
        return [env[v] for v in module.outputs], counts

    # ------------------------------------------------------------ checks

    @staticmethod
    def enabled_checks() -> tuple[str, ...]:
        """The non-finite values the config asks to trap: "NaN", "Inf"."""
        return (("NaN",) if config._values["debug_nans"] else ()) + (
            ("Inf",) if config._values["debug_infs"] else ())

    @staticmethod
    def find_nonfinite(value: Any, checks: Sequence[str]) -> str | None:
        """"NaN" or "Inf" if ``value`` is floating point and holds one that
        ``checks`` asks for, else None."""
        dtype = getattr(value, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            return None
        if "NaN" in checks and bool(jnp.isnan(value).any()):
            return "NaN"
        if "Inf" in checks and bool(jnp.isinf(value).any()):
            return "Inf"
        return None

    def _check(self, op: Op, path: str, args: list[Any], outs: list[Any],
               checks: tuple[str, ...]) -> None:
        for index, (out, result) in enumerate(zip(outs, op.results)):
            found = self.find_nonfinite(out, checks)
            if found is not None:
                raise FloatingPointError(
                    self._message(op, path, index, result, found,
                                  any(self.find_nonfinite(a, (found,)) for a in args)))

    @staticmethod
    def _message(op: Op, path: str, index: int, result: Value, found: str,
                 operand_had_it: bool) -> str:
        option = "debug_nans" if found == "NaN" else "debug_infs"
        where = f" at {op.source}" if op.source is not None else ""
        name = op.kind
        if op.kind == "host_fallback" and "op" in op.attrs:
            name = f"host_fallback ({op.attrs['op']})"
        if "/" in path:
            outer = path.split("/", 1)[0]
            inside = f", inside the fused kernel at op {outer}"
        else:
            inside = ""
        if op.kind in CONTROL_FLOW:
            what = (f"the '{name}' region op (op {path}){where}. Kernels inside scan/while/cond "
                    f"bodies are not checked one by one, so the {found} arose somewhere in this "
                    f"region's body")
        else:
            what = f"the kernel '{name}' (op {path}{inside}){where}"
        if operand_had_it:
            cause = (f"An operand already held {found}: it came in through the program's "
                     f"arguments or a constant.")
        else:
            cause = f"Its operands held no {found}: this op produced it."
        return (f"mtia_jax {option}: {found} in result {index} ({result.type}) of {what}. "
                f"{cause} Fix that line (for example, keep the input in the function's "
                f"domain), or turn the check off with "
                f"mtia_jax.config.update({option!r}, False).")


EXECUTORS = {"graph": GraphExecutor, "eager": EagerExecutor}
