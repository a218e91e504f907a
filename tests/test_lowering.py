"""The jaxpr importer, the IR text and the pass pipeline."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering import from_jaxpr
from lowering.ir import Module
from lowering.passes import dce
from lowering.pipeline import PASSES, PassContext, pass_name, run_passes
from mtia_jax.errors import UnsupportedOperationError


def _import(fn, *args) -> Module:
    return from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args))


# a primitive outside the importer's table (a user's own, say)
_UNKNOWN = jax.extend.core.Primitive("users_own_op")
_UNKNOWN.def_impl(lambda x: x)
_UNKNOWN.def_abstract_eval(lambda x: x)


def test_unsupported_primitive_names_primitive_and_user_line():
    def f(x):
        return _UNKNOWN.bind(x) * 2.0

    line = inspect.getsourcelines(f)[1] + 1
    with pytest.raises(UnsupportedOperationError) as info:
        mtia_jax.jit(f)(jnp.ones(4))
    message = str(info.value)
    assert "users_own_op" in message
    assert f"{__file__}:{line}" in message
    assert isinstance(info.value, NotImplementedError)


def test_as_text_shows_ops_types_and_source_lines():
    def f(x, w):
        return jnp.tanh(x @ w)

    line = inspect.getsourcelines(f)[1] + 1
    text = mtia_jax.jit(f).lower(jnp.ones((2, 3)), jnp.ones((3, 4))).as_text()
    assert "func @f(%0: f32[2,3], %1: f32[3,4])" in text
    assert "dot_general(%0, %1)" in text and ": f32[2,4]" in text
    assert f"tanh(%2) : f32[2,4]  # {__file__}:{line} (" in text


def test_call_primitives_are_inlined():
    @jax.custom_vjp
    def g(x):
        return x * 2

    g.defvjp(lambda x: (g(x), None), lambda _, ct: (ct * 2,))

    @jax.jit
    def inner(x):
        return jax.nn.relu(x) + 1

    module = _import(lambda x: g(inner(x)) + jax.nn.logsumexp(x), jnp.ones(3))
    kinds = {op.kind for op in module.ops}
    assert not kinds & set(from_jaxpr.CALL_PRIMITIVES)
    assert {"max", "mul", "exp", "log"} <= kinds


def test_dce_removes_unused_ops_and_keeps_numerics():
    def f(x):
        unused = jnp.exp(x) * 3  # noqa: F841
        return x + 1

    module = _import(f, jnp.ones(3))
    assert {"exp", "mul"} <= {op.kind for op in module.ops}
    after = dce.run(module)
    assert [op.kind for op in after.ops if op.kind != "constant"] == ["add"]
    np.testing.assert_array_equal(mtia_jax.jit(f)(jnp.arange(3.0)), f(jnp.arange(3.0)))


def test_dump_ir_writes_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MTIA_JAX_DUMP_IR", str(tmp_path))
    module = _import(lambda x: x * 2, jnp.ones(3))
    run_passes(module, PassContext(chip=mtia_jax.chips.get("mtia450")))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0].endswith(".00.import.ir.txt") and names[-1].endswith(f".{pass_name(PASSES[-1])}.ir.txt")
    assert len(names) == len(PASSES) + 1
    assert "mul" in (tmp_path / names[0]).read_text()


def test_every_first_slice_primitive_has_a_rule():
    first_slice = """add sub mul div neg max min pow integer_pow exp log tanh logistic sqrt rsqrt abs
        sign square erf eq ne lt le gt ge and or not select_n dot_general reduce_sum reduce_max
        reduce_min reduce_prod argmax argmin broadcast_in_dim reshape transpose squeeze expand_dims
        concatenate slice dynamic_slice dynamic_update_slice iota convert_element_type jit pjit
        closed_call custom_jvp_call custom_vjp_call""".split()
    assert set(first_slice) <= set(from_jaxpr.supported_primitives())
