"""Defining a mtia-jax primitive: one call wires every rule JAX needs.

A primitive is defined by its *reference implementation*, a pure jnp
function ``reference(*operands, **params)``. By default:

- impl: dispatch the primitive like any JAX op (compiles the lowering);
- abstract evaluation: ``jax.eval_shape`` of the reference;
- lowering: the reference, so the primitive runs under plain ``jax.jit`` on
  CPU/GPU with no MTIA in sight;
- JVP: ``jax.jvp`` of the reference (``jax.grad`` works, and JAX transposes
  the reference's linear ops);
- batching: ``jax.vmap`` of the reference over the batched operands.

A primitive with a better rule (a batching rule that keeps the primitive by
folding the batch into one of its dimensions, say) passes it explicitly.
Params must be hashable (they are part of the jaxpr).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir
from jax._src.interpreters import batching
from jax._src import core as _core


def check_float(fn: str, name: str, value) -> None:
    """Raise a TypeError naming ``fn``'s argument ``name`` unless it is a float array."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        got = "a non-array" if dtype is None else f"dtype {np.dtype(dtype).name}"
        raise TypeError(f"{fn}: {name} must be a floating-point array, got {got} "
                        f"({type(value).__name__})")


def shape_error(fn: str, name: str, got, expected: str) -> ValueError:
    """The ValueError for ``fn``'s argument ``name`` of shape ``got`` where
    ``expected`` (a description) was wanted."""
    return ValueError(f"{fn}: {name} has shape {tuple(got)}; expected {expected}")


def quantized(x, fmt: str | None, axis: int):
    """``x`` as the values an MX operand of format ``fmt`` holds (blocks along
    ``axis``), in ``x``'s dtype with a straight-through gradient; ``x`` itself
    when ``fmt`` is None. What a precision policy does to a kernel's operands."""
    from mtia_jax import mx  # mx imports nothing of the primitives; imported on use
    return x if fmt is None else mx.fake_quantize(x, fmt, axis)


def weight_formats(w_format, n: int) -> tuple:
    """A kernel's ``w_format`` param as one format (or None) per weight
    operand: one format for all ``n`` weights, or a tuple of ``n`` (per-group
    precision rules may give a kernel's weights different formats)."""
    if isinstance(w_format, tuple):
        if len(w_format) != n:
            raise ValueError(f"w_format: {len(w_format)} formats for {n} weights: {w_format}")
        return w_format
    return (w_format,) * n


def _abstract_eval_from(reference: Callable, multiple_results: bool):
    def abstract_eval(*avals, **params):
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        out = jax.eval_shape(functools.partial(reference, **params), *structs)
        to_aval = lambda s: _core.ShapedArray(s.shape, s.dtype)
        return [to_aval(o) for o in out] if multiple_results else to_aval(out)
    return abstract_eval


def _jvp_from(reference: Callable):
    def jvp(primals, tangents, **params):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        return jax.jvp(functools.partial(reference, **params), tuple(primals), tangents)
    return jvp


def _batching_from(reference: Callable):
    def batch(args, dims, **params):
        in_axes = [None if isinstance(d, batching.NotMapped) else d for d in dims]
        out = jax.vmap(functools.partial(reference, **params), in_axes=in_axes)(*args)
        return out, (jax.tree.map(lambda _: 0, out))
    return batch


def define_primitive(name: str, reference: Callable, *, multiple_results: bool = False,
                     abstract_eval: Callable | None = None, jvp: Callable | None = None,
                     batching_rule: Callable | None = None) -> Primitive:
    """A new primitive ``name`` whose semantics are ``reference``."""
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(functools.partial(dispatch.apply_primitive, prim))
    prim.def_abstract_eval(abstract_eval or _abstract_eval_from(reference, multiple_results))
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results=multiple_results))
    ad.primitive_jvps[prim] = jvp or _jvp_from(reference)
    batching.primitive_batchers[prim] = batching_rule or _batching_from(reference)
    return prim
