"""Property test: random small jnp programs give bit-identical results under
mtia_jax.jit and jax.jit.

Hypothesis draws a DAG of 3-12 steps over float32 or int32 inputs: unary
and binary elementwise ops (with broadcasting), reductions, reshapes and
transposes, matmuls of compatible shapes, where/select, slicing,
concatenation, cumulative sums and sorts. Graph mode emits the program's
own primitives into one XLA program, so every result must match bit for bit
(any NaN matches any NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import mtia_jax

# name -> (function, operand kinds it accepts: "f" float, "i" int, "fi" both)
UNARY: dict[str, tuple[Callable, str]] = {
    "neg": (lambda x: -x, "fi"),
    "abs": (jnp.abs, "fi"),
    "square": (jnp.square, "fi"),
    "sign": (jnp.sign, "fi"),
    "times3": (lambda x: x * 3, "fi"),
    "tanh": (jnp.tanh, "f"),
    "exp": (lambda x: jnp.exp(jnp.clip(x, -10.0, 10.0)), "f"),
    "sin": (jnp.sin, "f"),
    "floor": (jnp.floor, "f"),
    "sigmoid": (jax.nn.sigmoid, "f"),
    "sqrt_abs": (lambda x: jnp.sqrt(jnp.abs(x)), "f"),
    "log1p_abs": (lambda x: jnp.log1p(jnp.abs(x)), "f"),
    "invert": (jnp.invert, "i"),
    "shift_right": (lambda x: x >> 2, "i"),
    "to_float": (lambda x: x.astype(jnp.float32), "i"),
    "round_to_int": (lambda x: jnp.round(jnp.clip(x, -1e6, 1e6)).astype(jnp.int32), "f"),
}


def _safe_divisor(y):
    return jnp.where(y == 0, jnp.ones_like(y), y)


BINARY: dict[str, tuple[Callable, str]] = {
    "add": (jnp.add, "fi"),
    "sub": (jnp.subtract, "fi"),
    "mul": (jnp.multiply, "fi"),
    "max": (jnp.maximum, "fi"),
    "min": (jnp.minimum, "fi"),
    "div": (lambda x, y: x / (jnp.abs(y) + 1.0), "f"),
    "floordiv": (lambda x, y: x // _safe_divisor(y), "i"),
    "rem": (lambda x, y: x % _safe_divisor(y), "i"),
    "and": (jnp.bitwise_and, "i"),
    "xor": (jnp.bitwise_xor, "i"),
    "where_gt": (lambda x, y: jnp.where(x > y, x, y), "fi"),
    "select_positive": (lambda x, y: jnp.where(x > 0, x, y), "fi"),
    "atan2": (jnp.arctan2, "f"),
}

REDUCTIONS: dict[str, tuple[Callable, str]] = {
    "sum": (jnp.sum, "fi"),
    "max": (jnp.max, "fi"),
    "min": (jnp.min, "fi"),
    "mean": (jnp.mean, "f"),
    "argmax": (jnp.argmax, "fi"),
}


@dataclasses.dataclass(frozen=True)
class Var:
    shape: tuple[int, ...]
    kind: str  # "f" or "i"


@dataclasses.dataclass(frozen=True)
class Step:
    op: str          # "unary", "binary", "reduce", "reshape", "transpose", "matmul", ...
    name: str        # which one, or a variant
    args: tuple[int, ...]
    params: tuple = ()


@dataclasses.dataclass(frozen=True)
class Program:
    """Values are numbered inputs first, then one per step; ``outputs`` index them."""

    inputs: tuple[Var, ...]
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]

    def __call__(self, *args):
        values = list(args)
        for step in self.steps:
            values.append(_apply(step, values))
        return tuple(values[i] for i in self.outputs)


def _apply(step: Step, values: list):
    x = values[step.args[0]]
    if step.op == "unary":
        return UNARY[step.name][0](x)
    if step.op == "binary":
        return BINARY[step.name][0](x, values[step.args[1]])
    if step.op == "reduce":
        axis, keepdims = step.params
        if step.name == "argmax":
            return jnp.argmax(x, axis=axis, keepdims=keepdims)
        return REDUCTIONS[step.name][0](x, axis=axis, keepdims=keepdims)
    if step.op == "reshape":
        return x.reshape(step.params[0])
    if step.op == "transpose":
        return jnp.transpose(x, step.params[0])
    if step.op == "matmul":
        if step.name == "x@xT":
            return x @ x.T
        y = values[step.args[1]]
        return x @ y if step.name == "x@y" else x.T @ y
    if step.op == "where":
        y, z = values[step.args[1]], values[step.args[2]]
        return jnp.where(x > 0, y, z)
    if step.op == "slice":
        axis, start, stop = step.params
        return jax.lax.slice_in_dim(x, start, stop, axis=axis)
    if step.op == "concatenate":
        return jnp.concatenate([x, values[step.args[1]]], axis=step.params[0])
    if step.op == "cumsum":
        return jnp.cumsum(x, axis=step.params[0])
    if step.op == "cummax":
        return jax.lax.cummax(x, axis=step.params[0])
    if step.op == "sort":
        return jnp.sort(x, axis=step.params[0])
    raise AssertionError(step)


# ---------------------------------------------------------------- strategy

def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def _result_kind(*kinds: str) -> str:
    return "f" if "f" in kinds else "i"


@st.composite
def programs(draw) -> Program:
    kind = draw(st.sampled_from("fi"))
    m, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    input_shapes = draw(st.lists(st.sampled_from([(m, n), (m, n), (n,), (m, 1), (n, m), ()]),
                                 min_size=1, max_size=3))
    variables = [Var(s, kind) for s in input_shapes]
    inputs = tuple(variables)
    steps: list[Step] = []
    n_steps = draw(st.integers(3, 12))
    while len(steps) < n_steps:
        step, out = _draw_step(draw, variables)
        if step is None:
            continue
        steps.append(step)
        variables.append(out)
    last = len(variables) - 1
    extra = draw(st.lists(st.integers(0, last - 1), max_size=2, unique=True)) if last else []
    return Program(inputs, tuple(steps), (last, *extra))


def _draw_step(draw, variables: list[Var]):
    i = draw(st.integers(0, len(variables) - 1))
    x = variables[i]
    op = draw(st.sampled_from(["unary", "unary", "binary", "binary", "reduce", "reshape",
                               "transpose", "matmul", "where", "slice", "concatenate",
                               "cumsum", "sort"]))
    if op == "unary":
        name = draw(st.sampled_from([k for k, (_, kinds) in UNARY.items() if x.kind in kinds]))
        kind = {"to_float": "f", "round_to_int": "i"}.get(name, x.kind)
        return Step(op, name, (i,)), Var(x.shape, kind)
    if op == "binary":
        partners = [j for j, v in enumerate(variables) if _broadcasts(x.shape, v.shape) is not None]
        j = draw(st.sampled_from(partners))
        kind = _result_kind(x.kind, variables[j].kind)
        name = draw(st.sampled_from([k for k, (_, kinds) in BINARY.items() if kind in kinds]))
        return Step(op, name, (i, j)), Var(_broadcasts(x.shape, variables[j].shape), kind)
    if op == "reduce":
        name = draw(st.sampled_from([k for k, (_, kinds) in REDUCTIONS.items() if x.kind in kinds]))
        if name == "argmax" and not x.shape:
            return None, None
        axis = draw(st.sampled_from([None, *range(len(x.shape))]))
        keepdims = draw(st.booleans())
        if axis is None:
            shape = (1,) * len(x.shape) if keepdims else ()
        else:
            shape = tuple(1 if d == axis else s for d, s in enumerate(x.shape)
                          if keepdims or d != axis)
        kind = "i" if name == "argmax" else x.kind
        return Step(op, name, (i,), (axis, keepdims)), Var(shape, kind)
    if op == "reshape":
        size = int(np.prod(x.shape, dtype=np.int64))
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        shape = draw(st.sampled_from([(size,), (1, size), (size, 1)]
                                     + [(d, size // d) for d in divisors]))
        return Step(op, "to", (i,), (shape,)), Var(shape, x.kind)
    if op == "transpose":
        if len(x.shape) < 2:
            return None, None
        perm = tuple(draw(st.permutations(range(len(x.shape)))))
        return Step(op, "perm", (i,), (perm,)), Var(tuple(x.shape[p] for p in perm), x.kind)
    if op == "matmul":
        if len(x.shape) != 2:
            return None, None
        a, b = x.shape
        options = [("x@xT", None, (a, a))]
        options += [("x@y", j, (a, v.shape[1])) for j, v in enumerate(variables)
                    if len(v.shape) == 2 and v.shape[0] == b]
        options += [("xT@y", j, (b, v.shape[1])) for j, v in enumerate(variables)
                    if len(v.shape) == 2 and v.shape[0] == a]
        name, j, shape = draw(st.sampled_from(options))
        args = (i,) if j is None else (i, j)
        kind = x.kind if j is None else _result_kind(x.kind, variables[j].kind)
        return Step(op, name, args), Var(shape, kind)
    if op == "where":
        same = [j for j, v in enumerate(variables) if v.shape == x.shape]
        j, k = draw(st.sampled_from(same)), draw(st.sampled_from(same))
        return (Step(op, "x>0", (i, j, k)),
                Var(x.shape, _result_kind(variables[j].kind, variables[k].kind)))
    if not x.shape:
        return None, None
    axis = draw(st.integers(0, len(x.shape) - 1))
    if op == "slice":
        size = x.shape[axis]
        start = draw(st.integers(0, size - 1))
        stop = draw(st.integers(start + 1, size))
        shape = tuple(stop - start if d == axis else s for d, s in enumerate(x.shape))
        return Step(op, "in_dim", (i,), (axis, start, stop)), Var(shape, x.kind)
    if op == "concatenate":
        same_rest = [j for j, v in enumerate(variables) if len(v.shape) == len(x.shape)
                     and all(a == b for d, (a, b) in enumerate(zip(v.shape, x.shape)) if d != axis)]
        j = draw(st.sampled_from(same_rest))
        shape = tuple(s + variables[j].shape[axis] if d == axis else s
                      for d, s in enumerate(x.shape))
        return (Step(op, "axis", (i, j), (axis,)),
                Var(shape, _result_kind(x.kind, variables[j].kind)))
    if op == "cumsum":
        name = draw(st.sampled_from(["cumsum", "cummax"]))
        return Step(name, "axis", (i,), (axis,)), Var(x.shape, x.kind)
    return Step("sort", "axis", (i,), (axis,)), Var(x.shape, x.kind)


def _inputs(program: Program, seed: int):
    rng = np.random.default_rng(seed)
    args = []
    for v in program.inputs:
        if v.kind == "f":
            args.append(jnp.asarray((rng.standard_normal(v.shape) * 2).astype(np.float32)))
        else:
            args.append(jnp.asarray(rng.integers(-20, 21, size=v.shape, dtype=np.int32)))
    return args


def _assert_bitwise_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        if w.dtype.kind == "f":
            same = (g.view(np.uint32) == w.view(np.uint32)) | (np.isnan(g) & np.isnan(w))
            assert same.all(), f"{g[~same][:4]} vs {w[~same][:4]}"
        else:
            np.testing.assert_array_equal(g, w)


@settings(max_examples=40, deadline=None)
@given(program=programs(), seed=st.integers(0, 2**32 - 1))
def test_random_program_is_bitwise_equal_to_jax_jit(program, seed):
    args = _inputs(program, seed)
    # a fresh function object each example, so neither jit cache is reused
    fn = lambda *a: program(*a)  # noqa: E731
    _assert_bitwise_equal(mtia_jax.jit(fn)(*args), jax.jit(fn)(*args))
