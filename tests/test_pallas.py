"""Pallas kernels (``pl.pallas_call``) inside ``mtia_jax.jit``: one opaque
``pallas_call`` op (``lowering/pallas.py``) run in Pallas's interpret mode,
bit for bit ``jax.jit`` of the same function with ``interpret=True``; the
IR text; the passes leave the kernel alone; vmap, shard_map and precision
policies; and the errors for what is not supported."""

import functools
import inspect
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt
from jax.sharding import PartitionSpec as P

import mtia_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import pallas_kernels  # noqa: E402
from mtia_jax.errors import UnsupportedOperationError

KEY = jax.random.PRNGKey(0)


def _normal(i, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape, dtype)


def _matmul_source() -> str:
    """Where the example's tiled matmul calls pallas_call: the source line its op carries."""
    lines, start = inspect.getsourcelines(pallas_kernels.matmul)
    (offset,) = [i for i, text in enumerate(lines) if "return pl.pallas_call(" in text]
    return f"{pallas_kernels.__file__}:{start + offset}"


def _line(tag: str) -> int:
    """The line of this file that carries the comment ``# line: <tag>``."""
    lines = pathlib.Path(__file__).read_text().splitlines()
    (number,) = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"# line: {tag}")]
    return number


def _compiled_module(fn, *args, **jit_kwargs):
    """The module after the pass pipeline (what the executor runs)."""
    module, _ = mtia_jax.jit(fn, **jit_kwargs).lower(*args).optimize()
    return module


def run(fn, *args, mode="graph", **jit_kwargs):
    return mtia_jax.jit(fn, mode=mode, **jit_kwargs)(*args)


def assert_bit_equal_to_interpret(fn, *args, modes=("graph", "eager"), **jit_kwargs):
    """``fn(*args, interpret=...)`` through mtia_jax.jit equals, bit for
    bit, jax.jit of it with interpret=True."""
    want = jax.jit(functools.partial(fn, interpret=True))(*args)
    for mode in modes:
        got = run(functools.partial(fn, interpret=False), *args, mode=mode, **jit_kwargs)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    return want


def _pallas_ops(module):
    return [op for op in module.ops if op.kind == "pallas_call"]


# ------------------------------------------------------------ kernels

def scale_add(x, y, *, interpret=False):
    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = jnp.exp(x_ref[...]) * y_ref[...] + 1.0

    spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(x.shape[0] // 8,), in_specs=[spec, spec], out_specs=spec,
                          interpret=interpret)(x, y)


def matmul(x, w, *, bm=16, bn=32, bk=16, interpret=False):
    """The tiled matmul of examples/pallas_kernels.py at small blocks: a
    (M/bm, N/bn, K/bk) grid, the K steps accumulating into the output block."""
    return pallas_kernels.matmul(x, w, bm=bm, bn=bn, bk=bk, interpret=interpret)


def masked_sin(x, *, block=128, interpret=False):
    """Whole-array refs, each step loading and storing its window with
    ``pl.ds`` and a mask for the ragged end (masked loads and stores are
    ``jax.experimental.pallas.triton.load/store`` in this JAX)."""
    n = x.shape[0]

    def kernel(x_ref, o_ref):
        start = pl.program_id(0) * block
        mask = start + jnp.arange(block) < n
        v = plt.load(x_ref.at[pl.ds(start, block)], mask=mask, other=0.0)
        plt.store(o_ref.at[pl.ds(start, block)], jnp.sin(v) * 2.0, mask=mask)

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(pl.cdiv(n, block),), interpret=interpret)(x)


def decayed_row_sum(x, *, rows=8, interpret=False):
    """A ``lax.fori_loop`` over the rows of each block: acc = acc / 2 + row."""
    n, d = x.shape

    def kernel(x_ref, o_ref):
        def body(i, acc):
            return acc * 0.5 + x_ref[pl.ds(i, 1), :]
        o_ref[...] = lax.fori_loop(0, rows, body, jnp.zeros((1, d), x_ref.dtype))

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n // rows, 1, d), x.dtype),
                          grid=(n // rows,), in_specs=[pl.BlockSpec((rows, d), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0)),
                          interpret=interpret)(x)


def rms_norm(x, w, *, rows=8, eps=1e-6, interpret=False):
    """RMSNorm of each row in float32, scaled by w, written in x's dtype."""
    n, d = x.shape

    def kernel(x_ref, w_ref, o_ref):
        v = x_ref[...].astype(jnp.float32)
        mean_square = jnp.mean(v * v, axis=-1, keepdims=True)
        o_ref[...] = (v * lax.rsqrt(mean_square + eps) * w_ref[...]).astype(o_ref.dtype)

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(n // rows,),
                          in_specs=[pl.BlockSpec((rows, d), lambda i: (i, 0)),
                                    pl.BlockSpec((1, d), lambda i: (0, 0))],
                          out_specs=pl.BlockSpec((rows, d), lambda i: (i, 0)),
                          interpret=interpret)(x, w)


# ------------------------------------------------------------ numerics

def test_elementwise_kernel_equals_jax_interpret():
    assert_bit_equal_to_interpret(scale_add, _normal(1, (32, 128)), _normal(2, (32, 128)))


def test_tiled_matmul_with_k_loop_equals_jax_interpret():
    x, w = _normal(1, (32, 48)), _normal(2, (48, 64))
    out = assert_bit_equal_to_interpret(matmul, x, w)
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-4)


def test_masked_load_store_with_ds_equals_jax_interpret():
    x = jnp.linspace(-3.0, 3.0, 300, dtype=jnp.float32)  # 3 steps of 128, the last one ragged
    out = assert_bit_equal_to_interpret(masked_sin, x)
    np.testing.assert_allclose(out, jnp.sin(x) * 2.0, rtol=1e-6, atol=1e-6)


def test_fori_loop_in_kernel_body_equals_jax_interpret():
    assert_bit_equal_to_interpret(decayed_row_sum, _normal(1, (32, 64)))


def test_rms_norm_reduction_in_kernel_body_equals_jax_interpret():
    x, w = _normal(1, (32, 64), jnp.bfloat16), _normal(2, (1, 64))
    out = assert_bit_equal_to_interpret(rms_norm, x, w)
    ref = x.astype(jnp.float32) * lax.rsqrt(jnp.mean(x.astype(jnp.float32) ** 2, -1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


def test_kernel_between_jnp_ops_equals_jax_interpret():
    def f(x, y, interpret=False):
        return jnp.tanh(scale_add(x * 0.5, y, interpret=interpret)).sum(axis=1)

    assert_bit_equal_to_interpret(f, _normal(1, (16, 128)), _normal(2, (16, 128)))


def test_aliases_scratch_squeezed_element_and_memory_space_kernels_equal_jax_interpret():
    x = _normal(1, (32, 48))

    def aliased(x, interpret=False):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2.0
        spec = pl.BlockSpec((16, 48), lambda i: (i, 0))
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                              in_specs=[spec], out_specs=spec, input_output_aliases={0: 0},
                              interpret=interpret)(x)

    def with_scratch(x, interpret=False):  # sums the two row blocks through a scratch accumulator
        def kernel(x_ref, o_ref, acc_ref):
            @pl.when(pl.program_id(0) == 0)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)
            acc_ref[...] += x_ref[...]

            @pl.when(pl.program_id(0) == pl.num_programs(0) - 1)
            def _():
                o_ref[...] = acc_ref[...]
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 48), x.dtype), grid=(2,),
                              in_specs=[pl.BlockSpec((16, 48), lambda i: (i, 0))],
                              out_specs=pl.BlockSpec((16, 48), lambda i: (0, 0)),
                              scratch_shapes=[pltpu.VMEM((16, 48), jnp.float32)],
                              interpret=interpret)(x)

    def squeezed(x, interpret=False):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] + 1.0
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2, 2),
                              in_specs=[pl.BlockSpec((pl.Squeezed(), 16, 48), lambda b, i: (b, i, 0))],
                              out_specs=pl.BlockSpec((None, 16, 48), lambda b, i: (b, i, 0)),
                              interpret=interpret)(x)

    def element_rows(x, interpret=False):  # rows 0-7 and 16-23: an element offset, not a block index
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 3.0
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((2, 8, 48), x.dtype), grid=(2,),
                              in_specs=[pl.BlockSpec((pl.Element(8), 48), lambda i: (i * 16, 0))],
                              out_specs=pl.BlockSpec((None, 8, 48), lambda i: (i, 0, 0)),
                              interpret=interpret)(x)

    def memory_spaces(s, x, interpret=False):
        def kernel(s_ref, x_ref, o_ref):
            o_ref[...] = x_ref[...] * s_ref[0]
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                                        pl.BlockSpec(memory_space=pl.ANY)],
                              interpret=interpret)(s, x)

    assert_bit_equal_to_interpret(aliased, x)
    np.testing.assert_array_equal(assert_bit_equal_to_interpret(with_scratch, x), x[:16] + x[16:])
    assert_bit_equal_to_interpret(squeezed, _normal(2, (2, 32, 48)))
    np.testing.assert_array_equal(assert_bit_equal_to_interpret(element_rows, x)[1], x[16:24] * 3.0)
    assert_bit_equal_to_interpret(memory_spaces, jnp.array([3.0]), x)

    (op,) = _pallas_ops(mtia_jax.jit(aliased).lower(x).module)
    assert op.attrs["aliases"] == ((0, 0),)
    (op,) = _pallas_ops(mtia_jax.jit(with_scratch).lower(x).module)
    assert op.attrs["scratch"] == ("f32[16,48]",)
    (op,) = _pallas_ops(mtia_jax.jit(element_rows).lower(x).module)
    assert op.attrs["element_dims"] == ((0,), ())
    (op,) = _pallas_ops(mtia_jax.jit(memory_spaces).lower(jnp.array([3.0]), x).module)
    assert op.attrs["memory_spaces"] == ("smem", "any", "default")


# ------------------------------------------------------------ the IR

def test_as_text_shows_one_op_with_grid_blocks_name_and_semantics():
    x, w = _normal(1, (32, 48)), _normal(2, (48, 64))
    text = mtia_jax.jit(matmul).lower(x, w).as_text()
    assert text.count("pallas_call(") == 1
    line = (f"pallas_call(%0, %1) {{name=tiled_matmul, grid=(2,2,3), blocks=((16,16),(16,32)), "
            f"out_blocks=((16,32)), dimension_semantics=(parallel,parallel,arbitrary)}} : f32[32,64]"
            f"  # {_matmul_source()}")
    assert line in text
    # the kernel's jaxprs (body, index maps) are not dumped into the text
    assert "grid_mapping" not in text and "lambda" not in text and "interpret" not in text


def test_op_attrs_contract():
    x, w = _normal(1, (32, 48)), _normal(2, (48, 64))
    (op,) = _pallas_ops(mtia_jax.jit(matmul).lower(x, w).module)
    assert op.primitive.name == "pallas_call" and op.params["interpret"] is True
    assert op.params["grid_mapping"].grid == (2, 2, 3)
    assert op.attrs["name"] == "tiled_matmul" and op.attrs["grid"] == (2, 2, 3)
    assert op.attrs["blocks"] == ((16, 16), (16, 32)) and op.attrs["out_blocks"] == ((16, 32),)
    assert op.attrs["dimension_semantics"] == ("parallel", "parallel", "arbitrary")
    # the kernel's own name when none is given; no semantics when none are given
    (op,) = _pallas_ops(mtia_jax.jit(scale_add).lower(x[:16, :], x[:16, :]).module)
    assert op.attrs["name"] == "kernel" and "dimension_semantics" not in op.attrs


def test_passes_leave_the_kernel_alone():
    """No pass fuses a producer or consumer into the kernel (an elementwise
    producer would otherwise be recomputed inside it as a prologue)."""
    def f(x, y):
        return jnp.tanh(scale_add(x * 0.5 + 1.0, y)) * 2.0

    x, y = _normal(1, (16, 128)), _normal(2, (16, 128))
    lowered = mtia_jax.jit(f).lower(x, y)
    (imported,) = _pallas_ops(lowered.module)
    module, _ = lowered.optimize()
    (op,) = _pallas_ops(module)
    assert op.attrs == imported.attrs and op.params["jaxpr"] is imported.params["jaxpr"]
    assert not any(inner.kind == "pallas_call" for other in module.ops if other.kind == "fused_kernel"
                   for inner in other.regions["body"].ops)
    producer = {r: o for o in module.ops for r in o.results}[op.operands[0]]
    assert producer.kind == "fused_kernel"  # x * 0.5 + 1.0, written to HBM for the kernel to read


def test_kernel_with_debug_print_is_kept_when_its_result_is_unused():
    """As under jax.jit, a kernel with side effects runs even when nothing
    reads its results; a pure one nobody reads is dropped."""
    def f(x, effect):
        def kernel(x_ref, o_ref):
            if effect:
                pl.debug_print("step {}", pl.program_id(0))
            o_ref[...] = x_ref[...]
        spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
        pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                       in_specs=[spec], out_specs=spec)(x)
        return x + 1.0

    x = _normal(1, (16, 128))
    (op,) = _pallas_ops(_compiled_module(functools.partial(f, effect=True), x))
    assert op.attrs["effects"] is True
    assert not _pallas_ops(_compiled_module(functools.partial(f, effect=False), x))


# ------------------------------------------------------------ composition

def test_vmap_of_a_kernel_batches_its_grid():
    x, w = _normal(1, (3, 32, 48)), _normal(2, (48, 64))

    def f(x, w, interpret=False):
        return jax.vmap(lambda a: matmul(a, w, interpret=interpret))(x)

    assert_bit_equal_to_interpret(f, x, w)
    (op,) = _pallas_ops(mtia_jax.jit(f).lower(x, w).module)
    assert op.attrs["grid"] == (3, 2, 2, 3)
    assert op.attrs["blocks"] == ((None, 16, 16), (16, 32))
    assert op.attrs["dimension_semantics"] == ("parallel", "parallel", "parallel", "arbitrary")


def test_kernel_inside_shard_map_on_a_logical_mesh():
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    x, w = _normal(1, (64, 48)), _normal(2, (48, 128))

    def f(x, w):
        return jax.shard_map(matmul, mesh=mesh, in_specs=(P("data", None), P(None, "model")),
                             out_specs=P("data", "model"), check_vma=False)(x, w)

    got = run(f, x, w, mesh=mesh)
    block = jax.jit(functools.partial(matmul, interpret=True))
    want = np.block([[np.asarray(block(x[32 * i:32 * (i + 1)], w[:, 32 * j:32 * (j + 1)]))
                      for j in range(4)] for i in range(2)])
    np.testing.assert_array_equal(got, want)
    (op,) = _pallas_ops(_compiled_module(f, x, w, mesh=mesh))
    assert op.operands[0].type.shape == (32, 48) and op.results[0].type.shape == (32, 32)


def test_precision_policy_leaves_the_kernel_alone():
    """The policy quantizes the jnp matmul of a weight, not the kernel's math:
    the kernel's result is bit for bit jax.jit's with interpret=True."""
    x, w = _normal(1, (32, 64)), _normal(2, (64, 64))
    policy = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")

    def f(x, w, interpret=False):
        y = matmul(x, w, interpret=interpret)
        return y, y @ w

    want, _ = jax.jit(functools.partial(f, interpret=True))(x, w)
    got, quantized = run(f, x, w, precision=policy)
    np.testing.assert_array_equal(got, want)
    module = _compiled_module(f, x, w, precision=policy)
    kinds = {op.kind for op in module.ops} | {inner.kind for op in module.ops if op.kind == "fused_kernel"
                                               for inner in op.regions["body"].ops}
    assert "mx_matmul" in kinds  # the jnp matmul was rewritten
    (op,) = _pallas_ops(module)
    assert [v.type.dtype for v in op.operands] == [np.dtype("float32")] * 2
    assert not np.array_equal(quantized, want @ w)


def test_grad_of_a_kernel_is_a_clear_error():
    x = _normal(1, (32, 128))

    def no_program_id(x):
        def kernel(x_ref, o_ref):
            o_ref[...] = jnp.sin(x_ref[...])
        spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
        return pl.pallas_call(  # line: grad
            kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(4,), in_specs=[spec],
            out_specs=spec)(x)

    with pytest.raises(UnsupportedOperationError, match="reverse-mode autodiff") as info:
        mtia_jax.jit(jax.grad(lambda x: no_program_id(x).sum()))(x)
    assert f"{__file__}:{_line('grad')}" in str(info.value) and "custom_vjp" in str(info.value)
    # a kernel reading pl.program_id fails already in JAX's forward-mode rule
    with pytest.raises(UnsupportedOperationError, match="forward-mode autodiff") as info:
        mtia_jax.jit(jax.grad(lambda x: matmul(x, x.T[:, :32]).sum()))(x[:, :48])
    assert _matmul_source() in str(info.value)


def test_custom_vjp_around_a_kernel_differentiates():
    x = _normal(1, (16, 128))

    def double(x):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2.0
        spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                              in_specs=[spec], out_specs=spec)(x)

    @jax.custom_vjp
    def f(x):
        return double(x)

    f.defvjp(lambda x: (double(x), None), lambda _, g: (double(g),))
    grad = run(jax.grad(lambda x: (f(x) ** 2).sum()), x)
    np.testing.assert_array_equal(grad, 8.0 * x)


# ------------------------------------------------------------ unsupported features

def _prefetch(x, idx):
    def kernel(idx_ref, x_ref, o_ref):
        o_ref[...] = x_ref[...]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(2,),
        in_specs=[pl.BlockSpec((16, 48), lambda i, idx: (idx[i], 0))], out_specs=pl.BlockSpec((16, 48), lambda i, idx: (i, 0)))
    return pl.pallas_call(  # line: prefetch
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid_spec=grid_spec)(idx, x)


def _dynamic_grid(x, steps):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0
    spec = pl.BlockSpec((16, 48), lambda i: (i, 0))
    return pl.pallas_call(  # line: dynamic
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(steps,), in_specs=[spec],
        out_specs=spec)(x)


def _bounded_slice(x):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0
    in_spec = pl.BlockSpec((pl.BoundedSlice(8), 48), lambda i: (pl.ds(i * 16, 8), 0))
    return pl.pallas_call(  # line: bounded
        kernel, out_shape=jax.ShapeDtypeStruct((2, 8, 48), x.dtype), grid=(2,), in_specs=[in_spec],
        out_specs=pl.BlockSpec((None, 8, 48), lambda i: (i, 0, 0)))(x)


def _tpu_prng(x):
    def kernel(x_ref, o_ref):
        pltpu.prng_seed(0)
        o_ref[...] = pltpu.stateful_uniform(x_ref.shape, jnp.float32)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)  # line: prng


def _core_mesh(x):
    @functools.partial(pl.kernel, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       mesh=pltpu.create_tensorcore_mesh("core", num_cores=1))
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0
    return kernel(x)  # line: mesh


@pytest.mark.parametrize("fn, extra, feature, advice, tag", [
    (_prefetch, (jnp.array([1, 0], jnp.int32),), "scalar prefetch", "PrefetchScalarGridSpec", "prefetch"),
    (_dynamic_grid, (2,), "dynamic grid bounds", "Python ints", "dynamic"),
    (_bounded_slice, (), "BoundedSlice block dimension", "pl.Element", "bounded"),
    (_tpu_prng, (), "kernel using 'prng_seed'", "jnp / lax", "prng"),
    (_core_mesh, (), "core mesh", "pl.pallas_call over a grid", "mesh"),
], ids=["prefetch", "dynamic_grid", "bounded_slice", "tpu_prng", "core_mesh"])
def test_unsupported_feature_names_it_the_line_and_the_fix(fn, extra, feature, advice, tag):
    x = _normal(1, (32, 48))
    with pytest.raises(UnsupportedOperationError) as info:
        mtia_jax.jit(fn).lower(x, *extra)
    message = str(info.value)
    assert feature in message and advice in message
    assert f"{__file__}:{_line(tag)}" in message
    assert isinstance(info.value, NotImplementedError)


# ------------------------------------------------------------ cost model

def test_kernel_is_one_costed_kernel_in_jit_and_estimate(shapes_only):
    """With the cost model's rule (runtime.accelerated.pallas): the kernel
    is one kernel of kind pallas_call with a finite modeled time (the
    suite's conftest checks it is above the floor), in jit and in an
    estimate from shapes (which never runs it). How the time follows the
    blocks is tests/test_pallas_cost.py's."""
    structs = [jax.ShapeDtypeStruct((256, 256), jnp.float32)] * 2
    compiled = mtia_jax.jit(matmul).lower(*structs).compile()
    cost = compiled.cost_analysis()
    (kernel,) = compiled.cost.kernels
    assert cost["kernels"] == 1.0 and kernel.kind == f"pallas_call[{compiled.module.ops[0].attrs['name']}]"
    assert "pallas_call[" in compiled.kernel_table()  # the profile names the kernel
    assert 0 < cost["time_s"] < float("inf") and cost["flops"] >= 2 * 256 ** 3
    big = [jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)] * 2
    report = mtia_jax.estimate(functools.partial(matmul, bm=128, bn=128, bk=128), *big)
    assert 0 < report.time_s < float("inf")
