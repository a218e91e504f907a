"""``lowering.kernels``: which ops launch no kernel (views and scalar arithmetic),
checked op by op and through whole programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from lowering.ir import Module, Op, TensorType, Value
from lowering.kernels import contiguous, is_scalar, is_view
from mtia_jax import chips

F32, I32 = np.dtype(np.float32), np.dtype(np.int32)


def _v(shape, dtype=F32) -> Value:
    return Value(TensorType(tuple(shape), dtype))


def _op(kind, in_shapes, out_shape, dtype=F32, **params) -> Op:
    return Op(kind, [_v(s, dtype) for s in in_shapes], [_v(out_shape, dtype)], {"params": params})


def _slice(shape, start, limit, strides=None) -> Op:
    out = tuple((hi - lo + (s or 1) - 1) // (s or 1)
                for lo, hi, s in zip(start, limit, strides or (1,) * len(shape)))
    return _op("slice", [shape], out, start_indices=tuple(start), limit_indices=tuple(limit),
               strides=None if strides is None else tuple(strides))


def _dynamic_slice(shape, sizes) -> Op:
    scalars = [_v((), I32) for _ in shape]
    return Op("dynamic_slice", [_v(shape), *scalars], [_v(sizes)],
              {"params": {"slice_sizes": tuple(sizes)}})


def _fused(*body_ops: Op) -> Op:
    params = [v for op in body_ops for v in op.operands
              if not any(v in o.results for o in body_ops)]
    body = Module("fused", params, list(body_ops), list(body_ops[-1].results))
    return Op("fused_kernel", params, list(body_ops[-1].results),
              {"pattern": "elementwise"}, regions={"body": body})


# ------------------------------------------------------------ contiguous

@pytest.mark.parametrize("window, expected", [
    ((1, 1, 1), True),      # one element
    ((1, 1, 16), True),     # one row
    ((1, 3, 16), True),     # three whole rows of one plane
    ((1, 8, 16), True),     # one plane: cache[layer]
    ((2, 8, 16), True),     # two whole planes
    ((4, 8, 16), True),     # the whole array
    ((1, 8, 8), False),     # half of every row of a plane: 8 runs
    ((1, 2, 8), False),     # half rows
    ((2, 4, 16), False),    # 4 rows of each of 2 planes: 2 runs
    ((2, 1, 16), False),    # one row of each of 2 planes: 2 runs
    ((4, 8, 1), False),     # a column
])
def test_contiguous_windows_of_a_row_major_array(window, expected):
    assert contiguous((4, 8, 16), window) is expected


def test_contiguous_with_unit_dimensions_of_the_operand():
    # x[:, 3:5] of a row-major x with one row: an offset into x
    assert contiguous((1, 8), (1, 2))
    # leading dims of size one, then a partial innermost dim
    assert contiguous((1, 1, 8), (1, 1, 5))
    # a partial window in front of a size-one dim taken whole
    assert contiguous((6, 1), (2, 1))
    assert not contiguous((6, 2), (2, 1))


# ------------------------------------------------------------ is_view, op by op

@pytest.mark.parametrize("kind", ["reshape", "squeeze", "expand_dims", "stop_gradient"])
def test_view_category_ops_are_views(kind):
    assert is_view(_op(kind, [(4, 8)], (32,)))


@pytest.mark.parametrize("start, limit, strides, expected", [
    ((2, 0), (4, 8), None, True),        # x[2:4]: rows, contiguous
    ((3, 0), (4, 8), None, True),        # x[3]: one row
    ((0, 0), (8, 8), None, True),        # the whole array
    ((0, 2), (8, 4), None, False),       # x[:, 2:4]: 8 runs of 2
    ((3, 2), (4, 7), None, True),        # part of one row
    ((2, 0), (4, 8), (1, 1), True),      # explicit unit strides
    ((0, 0), (8, 8), (1, 2), False),     # x[:, ::2]: strided
    ((0, 0), (8, 8), (2, 1), False),     # x[::2]: strided rows
])
def test_slice_is_a_view_when_its_window_is_contiguous(start, limit, strides, expected):
    assert is_view(_slice((8, 8), start, limit, strides)) is expected


@pytest.mark.parametrize("sizes, expected", [
    ((1, 8), True),    # cache[i]
    ((3, 8), True),    # three rows from i
    ((16, 8), True),   # everything
    ((1, 2), True),    # part of one row
    ((16, 2), False),  # a column band: 16 runs
    ((2, 4), False),
])
def test_dynamic_slice_is_a_view_when_its_window_is_contiguous(sizes, expected):
    assert is_view(_dynamic_slice((16, 8), sizes)) is expected


@pytest.mark.parametrize("shape, perm, expected", [
    ((1, 8), (1, 0), True),           # (1, 8) -> (8, 1): same bytes
    ((2, 1, 3), (1, 0, 2), True),     # moves only the unit dim
    ((2, 1, 3), (0, 2, 1), True),
    ((1, 1, 5), (2, 1, 0), True),
    ((2, 3), (1, 0), False),          # a real transpose
    ((2, 1, 3), (2, 1, 0), False),    # swaps the non-unit dims
    ((2, 3), (0, 1), True),           # the identity permutation
])
def test_transpose_is_a_view_when_it_only_moves_unit_dims(shape, perm, expected):
    out = tuple(shape[p] for p in perm)
    assert is_view(_op("transpose", [shape], out, permutation=perm)) is expected


@pytest.mark.parametrize("shape, out, dims, expected", [
    ((8,), (8, 1), (0,), True),        # x[:, None]
    ((8,), (1, 8), (1,), True),        # x[None]
    ((1,), (1, 1, 1), (2,), True),
    ((), (1, 1), (), True),            # a scalar to a (1, 1) array
    ((8,), (8, 4), (0,), False),       # grows: writes 4x the bytes
    ((), (4,), (), False),             # a splat
    ((2, 3), (3, 2), (1, 0), False),   # same size, but reorders (a transpose)
])
def test_broadcast_is_a_view_when_it_only_adds_unit_dims(shape, out, dims, expected):
    op = _op("broadcast_in_dim", [shape], out, shape=out, broadcast_dimensions=dims)
    assert is_view(op) is expected


def test_fused_kernel_of_only_views_is_a_view():
    reshape = _op("reshape", [(4, 8)], (32,))
    again = Op("reshape", [reshape.results[0]], [_v((2, 16))], {"params": {}})
    assert is_view(_fused(reshape, again))
    # a row slice after the reshape: still views only
    rows = Op("slice", [again.results[0]], [_v((1, 16))],
              {"params": {"start_indices": (1, 0), "limit_indices": (2, 16), "strides": None}})
    assert is_view(_fused(reshape, again, rows))
    # one op that moves bytes makes the fused kernel a kernel
    neg = Op("neg", [again.results[0]], [_v((2, 16))], {"params": {}})
    assert not is_view(_fused(reshape, again, neg))
    strided = Op("slice", [again.results[0]], [_v((2, 8))],
                 {"params": {"start_indices": (0, 0), "limit_indices": (2, 16), "strides": (1, 2)}})
    assert not is_view(_fused(reshape, strided))


@pytest.mark.parametrize("kind", ["add", "neg", "exp", "copy", "concatenate", "dot_general",
                                  "reduce_sum", "gather", "iota"])
def test_kernels_are_not_views(kind):
    assert not is_view(_op(kind, [(4, 8)], (4, 8)))


# ------------------------------------------------------------ is_scalar, op by op

@pytest.mark.parametrize("kind", ["add", "lt", "select_n", "rem", "exp", "convert_element_type",
                                  "broadcast_in_dim"])
def test_scalar_arithmetic_is_scalar(kind):
    assert is_scalar(_op(kind, [(), ()], (), I32))


def test_size_one_arrays_count_as_scalars():
    # a position plus one as i32[1] (what a broadcast of a counter makes)
    assert is_scalar(_op("add", [(1,), (1,)], (1,), I32))
    assert is_scalar(_op("broadcast_in_dim", [()], (1, 1), I32, shape=(1, 1), broadcast_dimensions=()))


@pytest.mark.parametrize("kind, in_shapes, out_shape", [
    ("add", [(2,), (2,)], (2,)),         # a vector result
    ("add", [(2,), ()], ()),             # (invalid shapes, but) a vector operand
    ("broadcast_in_dim", [()], (4,)),    # a splat makes a vector
    ("reduce_sum", [()], ()),            # a reduction is not scalar arithmetic
    ("sort", [()], ()),
    ("dot_general", [(), ()], ()),       # contractions run on the matrix engine
    ("gather", [(), ()], ()),
])
def test_ops_on_arrays_or_the_matrix_engine_are_not_scalar(kind, in_shapes, out_shape):
    assert not is_scalar(_op(kind, in_shapes, out_shape, I32))


def test_op_without_results_is_not_scalar():
    assert not is_scalar(Op("add", [_v((), I32)], [], {"params": {}}))


def test_fused_kernel_of_scalar_ops_and_views_is_scalar():
    a, b = _v((), I32), _v((), I32)
    add = Op("add", [a, b], [_v((), I32)], {"params": {}})
    reshape = Op("reshape", [add.results[0]], [_v((1,), I32)], {"params": {}})
    assert is_scalar(_fused(add, reshape))
    vector = Op("broadcast_in_dim", [add.results[0]], [_v((3,), I32)],
                {"params": {"shape": (3,), "broadcast_dimensions": ()}})
    assert not is_scalar(_fused(add, vector))


# ------------------------------------------------------------ whole programs

def _compiled(f, *structs, **kw):
    return mtia_jax.jit(f, chip="mtia450", **kw).lower(*structs).compile()


@pytest.mark.parametrize("f, shape", [
    (lambda x: x.reshape(4, 2, 8)[0], (8, 8)),        # reshape, row slice, squeeze
    (lambda x: x[2:5], (8, 8)),
    (lambda x: x[3, 2:7], (8, 8)),
    (lambda x: x.T, (1, 8)),                           # transpose of a unit dim
    (lambda x: x[:, None, :].reshape(8, 8), (8, 8)),
    (lambda x: x, (8, 8)),
])
def test_a_program_of_only_views_launches_no_kernel(f, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    compiled = _compiled(f, x)
    assert compiled.cost.kernels == ()
    analysis = compiled.cost_analysis()
    assert analysis["kernels"] == 0
    assert analysis["time_s"] == 0.0 and analysis["hbm_bytes"] == 0.0
    # the result is a view of the input: nothing has to cross HBM
    assert compiled.cost.min_hbm_bytes == 0.0
    value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(compiled(value), jax.jit(f)(value))


def test_dynamic_row_and_index_arithmetic_launch_no_kernel():
    # x[i]: the wrap of a negative index (lt, add, select_n on scalars) runs
    # on the control core, and the row is an offset into x
    f = lambda x, i: x[i]
    compiled = _compiled(f, jax.ShapeDtypeStruct((16, 8), jnp.float32),
                         jax.ShapeDtypeStruct((), jnp.int32))
    kinds = {op.kind for op in compiled.module.ops}
    assert {"lt", "add", "select_n", "dynamic_slice"} <= kinds
    assert compiled.cost.kernels == ()
    x = np.arange(128, dtype=np.float32).reshape(16, 8)
    for i in (3, -2):
        np.testing.assert_array_equal(compiled(x, np.int32(i)), jax.jit(f)(x, np.int32(i)))


def test_strided_slice_is_a_kernel_charged_its_window():
    f = lambda x: x[:, ::2]
    chip = chips.get("mtia450")
    compiled = _compiled(f, jax.ShapeDtypeStruct((8, 8), jnp.float32))
    (kernel,) = compiled.cost.kernels
    assert kernel.kind == "slice"
    window = 8 * 4 * 4  # f32[8, 4]: read the window, write it
    assert kernel.hbm_bytes == 2 * window
    assert kernel.flops == 0
    assert kernel.hbm_s == pytest.approx(2 * window / (chip.hbm_bandwidth * chip.hbm_efficiency))
    assert compiled.cost.time_s == pytest.approx(kernel.hbm_s + chip.kernel_launch_s)
    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(compiled(x), jax.jit(f)(x))


def test_column_band_slice_is_a_kernel_charged_its_window_not_the_operand():
    f = lambda x: x[:, 2:4]
    compiled = _compiled(f, jax.ShapeDtypeStruct((64, 64), jnp.float32))
    (kernel,) = compiled.cost.kernels
    assert kernel.kind == "slice"
    assert kernel.hbm_bytes == 2 * 64 * 2 * 4  # not 64 * 64 * 4 for the operand
    x = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(compiled(x), jax.jit(f)(x))


def test_non_contiguous_dynamic_slice_is_a_kernel_charged_its_window():
    f = lambda x, i: lax.dynamic_slice(x, (0, i), (16, 2))
    compiled = _compiled(f, jax.ShapeDtypeStruct((16, 8), jnp.float32),
                         jax.ShapeDtypeStruct((), jnp.int32))
    (kernel,) = compiled.cost.kernels
    assert kernel.kind == "dynamic_slice"
    assert kernel.hbm_bytes == 2 * 16 * 2 * 4  # the scalar start is an immediate
    x = np.arange(128, dtype=np.float32).reshape(16, 8)
    np.testing.assert_array_equal(compiled(x, np.int32(5)), jax.jit(f)(x, np.int32(5)))


def test_kernel_after_a_view_reads_only_the_window():
    # the dynamic row window is a view; the transpose that follows reads it
    # (3 rows of 8 f32) and writes its result
    f = lambda x, i: lax.dynamic_slice(x, (i, 0), (3, 8)).T
    compiled = _compiled(f, jax.ShapeDtypeStruct((16, 8), jnp.float32),
                         jax.ShapeDtypeStruct((), jnp.int32))
    (kernel,) = compiled.cost.kernels
    assert kernel.kind == "transpose"
    assert kernel.hbm_bytes == 2 * 3 * 8 * 4
    x = np.arange(128, dtype=np.float32).reshape(16, 8)
    np.testing.assert_array_equal(compiled(x, np.int32(4)), jax.jit(f)(x, np.int32(4)))
