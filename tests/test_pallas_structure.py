"""The structure of Pallas kernels (``runtime.pallas_structure``): block
fetches and write-backs from the index maps, body work by engine, the
parallel split, and on-chip memory; every expectation computed by hand."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from runtime.pallas_structure import analyze

F32 = 4  # bytes


def _eqn(f, *args):
    """The pallas_call equation of ``f`` traced at ``args`` (shapes only)."""
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    return eqn


def _analyze(f, *args, **kwargs):
    eqn = _eqn(f, *args)
    return analyze(eqn.params, [v.aval for v in eqn.invars], **kwargs)


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _semantics(*dims):
    return pltpu.CompilerParams(dimension_semantics=dims)


# ------------------------------------------------------------ tiled matmul

M, N, K = 256, 256, 512
BM, BN, BK = 64, 128, 128


def _matmul(dtype=jnp.float32, semantics=None, scratch=False, bm=BM, bn=BN, bk=BK, m=M, n=N, k=K):
    def kernel(x_ref, w_ref, o_ref, *scratch_refs):
        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = jnp.zeros_like(o_ref)

        o_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    scratch_shapes = [pltpu.VMEM((bm, bn), jnp.float32), pltpu.SemaphoreType.DMA] if scratch else []

    def f(x, w):
        return pl.pallas_call(
            kernel, out_shape=_sds(m, n), grid=(m // bm, n // bn, k // bk),
            in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                      pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
            scratch_shapes=scratch_shapes, compiler_params=semantics, interpret=True)(x, w)

    return f, _sds(m, k, dtype=dtype), _sds(k, n, dtype=dtype)


def test_tiled_matmul_fetches_write_backs_and_bytes():
    s = _analyze(*_matmul(semantics=_semantics("parallel", "parallel", "arbitrary")))
    assert s.grid == (4, 2, 4) and s.steps == 32
    assert s.dimension_semantics == ("parallel", "parallel", "arbitrary")
    assert (s.parallel_steps, s.sequential_steps) == (8, 4)
    x, w, o = s.operands
    assert [op.role for op in s.operands] == ["input", "input", "output"]
    assert (x.block_shape, x.block_bytes) == ((64, 128), 64 * 128 * F32)
    assert (w.block_shape, w.block_bytes) == ((128, 128), 128 * 128 * F32)
    assert (o.block_shape, o.block_bytes) == ((64, 128), 64 * 128 * F32)
    # k is the fastest axis and K/bk = 4 > 1: x's (i, k) and w's (k, j) change at every step
    assert x.fetches == w.fetches == 32
    # o's (i, j) changes once per (i, j): M/bm * N/bn write-backs
    assert o.write_backs == (256 // 64) * (256 // 128) == 8
    assert o.fetches == 0 and x.write_backs == 0
    # x is read N/bn = 2 times over, w M/bm = 4 times, o written once
    assert x.hbm_bytes == 2 * M * K * F32 == s.operands[0].fetches * x.block_bytes
    assert w.hbm_bytes == 4 * K * N * F32
    assert s.hbm_read_bytes == 2 * M * K * F32 + 4 * K * N * F32
    assert s.hbm_write_bytes == M * N * F32


def test_tiled_matmul_body_work():
    s = _analyze(*_matmul())
    assert s.work_per_step.matrix_flops == 2 * BM * BN * BK
    assert s.work_per_step.matrix_flops_by_dtype == (("float32", 2 * BM * BN * BK),)
    assert s.work_total.matrix_flops == 2 * M * N * K
    # o_ref[...] += dot: one add per output element at every step
    assert s.work_per_step.vector_ops == BM * BN
    assert s.work_total.vector_ops == 32 * BM * BN
    assert s.work_per_step.transcendentals == 0
    # the zero fill under pl.when(k == 0) runs at the 4 * 2 steps where k == 0 only
    assert s.work_per_step.relayout_elements == BM * BN
    assert s.work_total.relayout_elements == 8 * BM * BN
    assert s.notes == ()


def test_matrix_flops_keep_the_operand_dtype():
    s = _analyze(*_matmul(dtype=jnp.bfloat16))
    assert s.work_total.matrix_flops_by_dtype == (("bfloat16", 2 * M * N * K),)
    assert s.operands[0].block_bytes == BM * BK * 2


def test_block_set_bytes_double_buffers_blocks_and_adds_scratch():
    s = _analyze(*_matmul())
    blocks = (64 * 128 + 128 * 128 + 64 * 128) * F32
    assert s.block_set_bytes == 2 * blocks
    s = _analyze(*_matmul(scratch=True))
    # a VMEM f32[64, 128] accumulator; the DMA semaphore holds no data
    assert s.scratch_bytes == 64 * 128 * F32
    assert s.block_set_bytes == 2 * blocks + 64 * 128 * F32


def test_buffered_pipeline_mode_sets_the_buffer_count():
    def f(x):
        return pl.pallas_call(
            lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]), out_shape=_sds(64, 128),
            grid=(8,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0),
                                              pipeline_mode=pl.Buffered(3))],
            out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)), interpret=True)(x)

    s = _analyze(f, _sds(64, 128))
    assert [op.buffers for op in s.operands] == [3, 2]
    assert s.block_set_bytes == (3 + 2) * 8 * 128 * F32


# ------------------------------------------------------------ traffic patterns

def test_elementwise_kernel():
    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = x_ref[...] * y_ref[...] + 1.0

    def f(x, y):
        spec = pl.BlockSpec((16, 128), lambda i, j: (i, j))
        return pl.pallas_call(kernel, out_shape=_sds(64, 256), grid=(4, 2), in_specs=[spec, spec],
                              out_specs=spec, interpret=True)(x, y)

    s = _analyze(f, _sds(64, 256), _sds(64, 256))
    assert [op.transfers for op in s.operands] == [8, 8, 8]
    assert s.hbm_read_bytes == 2 * 64 * 256 * F32 and s.hbm_write_bytes == 64 * 256 * F32
    assert s.work_per_step.vector_ops == 2 * 16 * 128  # mul and add
    assert s.work_total.vector_ops == 8 * 2 * 16 * 128
    assert s.work_total.matrix_flops == s.work_total.transcendentals == 0


def _row_broadcast(semantics=None, grid=(4, 8)):
    """x's block depends on the outer axis only; y and o follow both axes."""
    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = x_ref[...] + y_ref[...]

    rows, cols = grid[0] * 8, grid[1] * 128

    def f(x, y):
        return pl.pallas_call(
            kernel, out_shape=_sds(rows, cols), grid=grid,
            in_specs=[pl.BlockSpec((8, 128), lambda i, j: (i, 0)),
                      pl.BlockSpec((8, 128), lambda i, j: (i, j))],
            out_specs=pl.BlockSpec((8, 128), lambda i, j: (i, j)),
            compiler_params=semantics, interpret=True)(x, y)

    return f, _sds(rows, 128), _sds(rows, cols)


def test_block_that_ignores_the_inner_axis_is_fetched_once_per_outer_step():
    s = _analyze(*_row_broadcast())
    x, y, o = s.operands
    assert (x.fetches, y.fetches, o.write_backs) == (4, 32, 32)
    assert x.hbm_bytes == 4 * 8 * 128 * F32


def test_edge_block_moves_only_its_in_bounds_part():
    def f(x):
        spec = pl.BlockSpec((64, 128), lambda i: (i, 0))
        return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2.0),
                              out_shape=_sds(100, 128), grid=(2,), in_specs=[spec],
                              out_specs=spec, interpret=True)(x)

    s = _analyze(f, _sds(100, 128))
    x, o = s.operands
    assert x.fetches == o.write_backs == 2
    assert x.block_bytes == 64 * 128 * F32              # the on-chip footprint: full blocks
    assert x.hbm_bytes == (64 + 36) * 128 * F32          # rows 64..99 of the second block
    assert o.hbm_bytes == 100 * 128 * F32
    assert s.block_set_bytes == 2 * 2 * 64 * 128 * F32


def test_operand_in_any_memory_space_is_not_pipelined():
    def kernel(x_ref, table_ref, o_ref):
        o_ref[...] = x_ref[...]

    def f(x, table):
        return pl.pallas_call(
            kernel, out_shape=_sds(32, 128), grid=(4,),
            in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)), interpret=True)(x, table)

    s = _analyze(f, _sds(32, 128), _sds(1024, 128))
    table = s.operands[1]
    assert (table.buffers, table.fetches, table.hbm_bytes) == (0, 0, 0)
    assert s.block_set_bytes == 2 * 2 * 8 * 128 * F32


def _prefetch_gather():
    def kernel(s_ref, x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def f(rows, x):
        spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(4, 2),
            in_specs=[pl.BlockSpec((8, 128), lambda i, j, s: (s[i], 0))],
            out_specs=pl.BlockSpec((8, 128), lambda i, j, s: (i, j)))
        return pl.pallas_call(kernel, out_shape=_sds(32, 256), grid_spec=spec,
                              interpret=True)(rows, x)

    return _eqn(f, _sds(4, dtype=jnp.int32), _sds(32, 128))


def test_index_map_reading_scalar_prefetch_is_exact_with_values_and_bounded_without():
    eqn = _prefetch_gather()
    avals = [v.aval for v in eqn.invars]
    s = analyze(eqn.params, avals)
    x, o = s.operands
    assert x.data_dependent and x.fetches == 8 and not o.data_dependent and o.write_backs == 8
    assert any("scalar-prefetch" in note for note in s.notes)
    # block rows 0, 0, 1, 1 for i = 0..3, the same for both j: a fetch when i moves to 2
    s = analyze(eqn.params, avals, index_operands=[jnp.array([0, 0, 1, 1], jnp.int32)])
    assert not s.operands[0].data_dependent and s.operands[0].fetches == 2
    assert s.notes == ()


# ------------------------------------------------------------ parallel split

def test_parallel_split_refetches_every_block_at_each_unit_start():
    def kernel(w_ref, x_ref, o_ref):
        o_ref[...] = x_ref[...] * w_ref[...]

    def f(w, x):
        return pl.pallas_call(
            kernel, out_shape=_sds(64, 512), grid=(8, 4),
            in_specs=[pl.BlockSpec((8, 128), lambda i, j: (0, 0)),      # the same block everywhere
                      pl.BlockSpec((8, 128), lambda i, j: (i, j))],
            out_specs=pl.BlockSpec((8, 128), lambda i, j: (i, j)),
            compiler_params=_semantics("parallel", "arbitrary"), interpret=True)(w, x)

    args = f, _sds(8, 128), _sds(64, 512)
    one = _analyze(*args)
    assert (one.parallel_steps, one.sequential_steps, one.units_used) == (8, 4, 1)
    assert one.operands[0].fetches == 1
    four = _analyze(*args, parallel_units=4)
    assert four.unit_steps == (8, 8, 8, 8)
    assert four.operands[0].fetches == 4 and four.operands[0].unit_transfers == (1, 1, 1, 1)
    assert four.operands[1].fetches == one.operands[1].fetches == 32  # changes every step anyway
    # 8 parallel iterations over 3 units: chunks of 3, 3 and 2 rows
    three = _analyze(*args, parallel_units=3)
    assert three.unit_steps == (12, 12, 8)
    assert three.operands[0].fetches == 3
    assert three.unit_read_bytes == (4096 + 12 * 4096, 4096 + 12 * 4096, 4096 + 8 * 4096)
    # more units than parallel iterations: one iteration each, the rest idle
    many = _analyze(*args, parallel_units=16)
    assert many.units_used == 8 and many.operands[0].fetches == 8
    assert many.work_total == one.work_total
    assert many.unit_work[0].vector_ops == 4 * 8 * 128


def test_parallel_inner_axis_splits_each_units_iterations():
    # grid (2, 4), only j parallel: unit 0 runs j in {0, 1}, unit 1 j in {2, 3}, each
    # over both i; x's block (i, 0) changes with i, so each unit fetches it twice
    s = _analyze(*_row_broadcast(_semantics("arbitrary", "parallel"), grid=(2, 4)),
                 parallel_units=2)
    assert (s.parallel_steps, s.sequential_steps) == (4, 2)
    assert s.unit_steps == (4, 4)
    assert s.operands[0].fetches == 4 and s.operands[0].unit_transfers == (2, 2)
    assert _analyze(*_row_broadcast(_semantics("arbitrary", "parallel"), grid=(2, 4))
                    ).operands[0].fetches == 2


def test_without_dimension_semantics_every_axis_is_sequential():
    s = _analyze(*_matmul(), parallel_units=4)
    assert s.dimension_semantics == ("arbitrary",) * 3
    assert (s.parallel_steps, s.sequential_steps, s.units_used) == (1, 32, 1)
    assert s.unit_steps == (32,)


def test_dimension_semantics_must_match_the_grid():
    with pytest.raises(ValueError, match="dimension_semantics"):
        _analyze(*_matmul(semantics=_semantics("parallel", "arbitrary")))


def test_vmap_adds_a_parallel_grid_axis_and_keeps_program_ids_on_the_users_axes():
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = jnp.exp(x_ref[...])

    def f(x):
        spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
        return pl.pallas_call(kernel, out_shape=_sds(32, 128), grid=(4,), in_specs=[spec],
                              out_specs=spec, interpret=True)(x)

    s = _analyze(jax.vmap(f), _sds(3, 32, 128), parallel_units=3)
    assert s.grid == (3, 4) and s.dimension_semantics == ("parallel", "arbitrary")
    assert s.units_used == 3 and s.operands[0].fetches == 12
    assert s.operands[0].block_shape == (None, 8, 128)  # the batch axis is squeezed
    # the exp runs where the user's axis 0 (grid axis 1) is 0: once per batch element
    assert s.work_total.transcendentals == 3 * 8 * 128


# ------------------------------------------------------------ loops and conds

def _loop_kernel(body_of):
    def f(x):
        spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
        return pl.pallas_call(body_of, out_shape=_sds(32, 128), grid=(4,), in_specs=[spec],
                              out_specs=spec, interpret=True)(x)

    return f, _sds(32, 128)


BLOCK = 8 * 128


def test_fori_loop_multiplies_its_body_by_the_trip_count():
    def kernel(x_ref, o_ref):
        o_ref[...] = lax.fori_loop(0, 5, lambda i, acc: acc + jnp.exp(x_ref[...]),
                                   jnp.zeros((8, 128), jnp.float32))

    s = _analyze(*_loop_kernel(kernel))
    assert s.work_per_step.transcendentals == 5 * BLOCK
    assert s.work_per_step.vector_ops == 5 * BLOCK
    assert s.work_total.transcendentals == 4 * 5 * BLOCK
    assert s.notes == ()


def test_fori_loop_bounded_by_the_program_id_counts_each_steps_trips():
    def kernel(x_ref, o_ref):  # a causal loop: step i runs i + 1 trips
        o_ref[...] = lax.fori_loop(0, pl.program_id(0) + 1,
                                   lambda i, acc: acc + jnp.exp(x_ref[...]),
                                   jnp.zeros((8, 128), jnp.float32))

    s = _analyze(*_loop_kernel(kernel))
    assert s.work_per_step.transcendentals == 4 * BLOCK
    assert s.work_total.transcendentals == (1 + 2 + 3 + 4) * BLOCK
    assert s.notes == ()


def test_while_loop_with_a_data_dependent_bound_counts_one_trip_and_says_so():
    def kernel(x_ref, o_ref):
        n = x_ref[0, 0].astype(jnp.int32)
        o_ref[...] = lax.fori_loop(0, n, lambda i, acc: acc + jnp.exp(x_ref[...]),
                                   jnp.zeros((8, 128), jnp.float32))

    s = _analyze(*_loop_kernel(kernel))
    assert s.work_per_step.transcendentals == BLOCK
    assert any("counted as one trip" in note for note in s.notes)


def test_cond_on_data_counts_its_larger_branch():
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

        @pl.when(x_ref[0, 0] > 0)
        def _():
            o_ref[...] = jnp.tanh(x_ref[...]) + 1.0

    s = _analyze(*_loop_kernel(kernel))
    assert s.work_per_step.transcendentals == BLOCK
    assert s.work_total.transcendentals == 4 * BLOCK
    assert s.work_per_step.vector_ops == BLOCK  # the add; the scalar compare is not counted


def test_softmax_counts_its_exp_on_the_special_function_unit():
    def kernel(x_ref, o_ref):
        x = x_ref[...]
        e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
        o_ref[...] = e / jnp.sum(e, axis=-1, keepdims=True)

    s = _analyze(*_loop_kernel(kernel))
    assert s.work_per_step.transcendentals == BLOCK
    # reduce_max and reduce_sum fold 128 - 1 elements per row; sub and div one per element
    assert s.work_per_step.vector_ops == 2 * (BLOCK - 8) + 2 * BLOCK
    assert s.work_per_step.relayout_elements == 2 * 8  # the two keepdims broadcasts
    assert s.work_per_step.matrix_flops == 0


def test_kernel_without_grid_runs_one_step_and_counts_inside_wrapped_functions():
    def kernel(x_ref, o_ref):  # relu is a custom_jvp around a jit: its max is counted
        o_ref[...] = jax.nn.gelu(x_ref[...]) + jax.nn.relu(x_ref[...])

    def f(x):
        return pl.pallas_call(kernel, out_shape=_sds(8, 128), interpret=True)(x)

    s = _analyze(f, _sds(8, 128))
    assert (s.grid, s.steps, s.unit_steps) == ((), 1, (1,))
    assert [op.transfers for op in s.operands] == [1, 1]
    # gelu (tanh form): x**3, 2 muls, add, tanh, add, 2 muls; relu: max; then the add
    assert s.work_total.vector_ops == (7 + 1 + 1) * BLOCK
    assert s.work_total.transcendentals == BLOCK


def test_primitive_without_a_rule_counts_one_vector_op_per_element_and_says_so():
    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.sort(x_ref[...], axis=-1)

    s = _analyze(*_loop_kernel(kernel))
    assert s.work_per_step.vector_ops == BLOCK
    assert any("'sort'" in note for note in s.notes)


# ------------------------------------------------------------ scale

def test_a_64x64x64_grid_is_analyzed_vectorized():
    f, x, w = _matmul(bm=8, bn=128, bk=128, m=64 * 8, n=64 * 128, k=64 * 128,
                      semantics=_semantics("parallel", "parallel", "arbitrary"))
    s = _analyze(f, x, w, parallel_units=64)
    assert s.grid == (64, 64, 64) and s.steps == 64 ** 3
    x_traffic, w_traffic, o_traffic = s.operands
    assert x_traffic.fetches == w_traffic.fetches == 64 ** 3
    assert o_traffic.write_backs == 64 * 64
    assert s.unit_steps == (64 ** 2,) * 64
    assert s.work_total.matrix_flops == 2 * (64 * 8) * (64 * 128) * (64 * 128)
    assert s.work_total.relayout_elements == 64 * 64 * 8 * 128  # the k == 0 zero fills
