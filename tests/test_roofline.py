"""``runtime.roofline.floor_bytes`` by hand, and the touched-byte rules of
``runtime.op_work`` it is built on; the modeled time never beats the floor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from kernels import inner, kernels_with, ops_with
from lowering.ir import TensorType
from mtia_jax import chips
from runtime.op_work import hbm_bytes, kernel_reads_writes, operand_reads, result_writes, work_of
from runtime.work import ACCESS_GRANULE_BYTES, granules, scattered_bytes
from runtime.roofline import floor_bytes

S = jax.ShapeDtypeStruct
F32 = jnp.float32
CHIP = chips.get("mtia450")


def _compiled(f, *structs, donate=()):
    return mtia_jax.jit(f, chip="mtia450", donate_argnums=donate).lower(*structs).compile()


def _floor(compiled) -> float:
    """The floor bytes, checked to be what the program's cost reports, and
    the modeled time checked against the roofline."""
    fb = floor_bytes(compiled.module)
    cost = compiled.cost
    assert cost.min_hbm_bytes == fb
    assert cost.roofline_time_s >= fb / CHIP.hbm_bandwidth
    assert cost.time_s >= cost.roofline_time_s
    return fb


# ------------------------------------------------------------ floor_bytes by hand

def test_elementwise_reads_its_input_and_writes_its_output():
    compiled = _compiled(lambda x: x * 2.0, S((64, 64), F32))
    nbytes = 64 * 64 * 4
    assert _floor(compiled) == 2 * nbytes
    # memory-bound: the roofline is the bytes over the peak bandwidth
    assert compiled.cost.roofline_time_s == pytest.approx(2 * nbytes / CHIP.hbm_bandwidth, rel=1e-12)


def test_two_inputs_one_broadcast():
    # a (64, 64) + b (64,): both read once, the (64, 64) result written once
    compiled = _compiled(lambda a, b: a + b, S((64, 64), F32), S((64,), F32))
    assert _floor(compiled) == 64 * 64 * 4 + 64 * 4 + 64 * 64 * 4


def test_gather_of_three_rows_of_a_big_table():
    # table f32[65536, 64] (16 MiB): 3 rows of 256 bytes (4 whole granules each)
    compiled = _compiled(lambda t, i: t[i], S((1 << 16, 64), F32), S((3,), jnp.int32))
    rows = 3 * 64 * 4
    assert _floor(compiled) == rows + 3 * 4 + rows  # rows read + indices + output
    (kernel,) = kernels_with(compiled.cost.kernels, "gather")
    assert kernel.hbm_bytes == rows + 3 * 4 + rows


def test_gather_of_short_rows_reads_whole_granules():
    # rows of 5 f32 (20 bytes) cost one 64-byte granule each
    compiled = _compiled(lambda t, i: t[i], S((100, 5), F32), S((3,), jnp.int32))
    assert _floor(compiled) == 3 * ACCESS_GRANULE_BYTES + 3 * 4 + 3 * 5 * 4


def test_gather_that_would_move_more_than_the_table_streams_it_once():
    # 40 rows x 64-byte granules = 2560 bytes > the 2000-byte table
    compiled = _compiled(lambda t, i: t[i], S((100, 5), F32), S((40,), jnp.int32))
    assert _floor(compiled) == 100 * 5 * 4 + 40 * 4 + 40 * 5 * 4


@pytest.mark.parametrize("f", [lambda x: x, lambda x: x.reshape(-1), lambda x: x[2:5],
                               lambda x: x.reshape(4, 4, 8)[1]])
def test_an_output_that_is_an_input_or_a_view_of_one_needs_no_write(f):
    compiled = _compiled(f, S((16, 8), F32))
    assert _floor(compiled) == 0.0
    assert compiled.cost.roofline_time_s == 0.0


def test_a_view_output_beside_a_kernel_output():
    # the reshape is free; x is read once for the add, its result written
    compiled = _compiled(lambda x: (x.reshape(-1), x + 1.0), S((16, 8), F32))
    assert _floor(compiled) == 2 * 16 * 8 * 4


def test_a_constant_output_needs_no_write():
    compiled = _compiled(lambda x: (x * 2.0, jnp.ones((4, 4), F32)), S((16, 8), F32))
    assert _floor(compiled) == 2 * 16 * 8 * 4


def test_donated_in_place_update_counts_only_the_rows_written():
    # cache f32[1048576, 128] (512 MiB), donated; one row of 512 bytes written
    f = lambda c, n, i: lax.dynamic_update_slice_in_dim(c, n, i, axis=0)
    structs = (S((1 << 20, 128), F32), S((1, 128), F32), S((), jnp.int32))
    compiled = _compiled(f, *structs, donate=(0,))
    row = 128 * 4
    # the row read from its input and written into the cache; the cache is neither read nor copied
    assert _floor(compiled) == 2 * row
    assert compiled.cost.roofline_time_s == pytest.approx(2 * row / CHIP.hbm_bandwidth, rel=1e-12)


def test_update_of_a_kept_buffer_writes_its_whole_output():
    f = lambda c, n, i: lax.dynamic_update_slice_in_dim(c, n, i, axis=0)
    structs = (S((16, 8), F32), S((1, 8), F32), S((), jnp.int32))
    compiled = _compiled(f, *structs)
    cache, row = 16 * 8 * 4, 8 * 4
    # the 15 rows around the update are read, the update read, the new cache written whole
    assert _floor(compiled) == (cache - row) + row + cache


def test_scan_over_stacked_weights_reads_every_weight_once():
    L, B, D = 4, 8, 64

    def f(x, ws):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    compiled = _compiled(f, S((B, D), F32), S((L, D, D), F32))
    weights, x = L * D * D * 4, B * D * 4
    # every layer's weights once; the carry's initial value once (later trips
    # read what the previous one wrote: an intermediate); the result once
    assert _floor(compiled) == weights + x + x
    # each trip's kernel reads h and W and writes h: the floor is below what runs
    (kernel,) = kernels_with(compiled.cost.kernels, "dot_general")
    assert kernel.count == L and kernel.hbm_bytes == L * (x + D * D * 4 + x)


def test_scan_stacking_its_outputs_writes_each_slice():
    L, B, D = 4, 8, 64

    def f(x, ws):
        return lax.scan(lambda h, w: (h, jnp.tanh(h @ w)), x, ws)[1]

    compiled = _compiled(f, S((B, D), F32), S((L, D, D), F32))
    weights, x = L * D * D * 4, B * D * 4
    # x read; every weight read; the stacked (L, B, D) result written: L slices of B x D
    assert _floor(compiled) == x + weights + L * x


# ------------------------------------------------------------ touched bytes of ops

def test_scattered_bytes_rounds_runs_to_granules_and_streams_when_cheaper():
    table = TensorType((100, 5), np.dtype(np.float32))
    assert scattered_bytes(table, 3, (1, 5)) == (3 * 64.0, 3.0)
    assert scattered_bytes(table, 31, (1, 5)) == (31 * 64.0, 31.0)   # 1984 < 2000
    assert scattered_bytes(table, 32, (1, 5)) == (2000.0, 0.0)       # 2048 >= 2000: stream it
    wide = TensorType((100, 17), np.dtype(np.float32))               # 68-byte rows: 2 granules
    assert scattered_bytes(wide, 2, (1, 17)) == (2 * 128.0, 2.0)
    cube = TensorType((4, 16, 8), np.dtype(np.float32))
    # one row of 8 of each of 2 planes: 2 runs of 32 bytes
    assert scattered_bytes(cube, 1, (2, 1, 8)) == (2 * 64.0, 2.0)
    # two whole rows of one plane: one run of 64 bytes
    assert scattered_bytes(cube, 1, (1, 2, 8)) == (64.0, 1.0)
    assert granules(1) == 64 and granules(64) == 64 and granules(65) == 128


def test_gather_work_reads_rows_and_indices_and_writes_its_result():
    compiled = _compiled(lambda t, i: t[i], S((100, 5), F32), S((3,), jnp.int32))
    (kernel_op,) = ops_with(compiled.module.ops, "gather")
    gather = inner(kernel_op, "gather")
    work = work_of(gather)
    assert operand_reads(gather, work) == (3 * 64.0, 3 * 4.0)  # indices i32[3, 1]
    assert result_writes(gather, work) == 3 * 5 * 4
    assert work.random_accesses == 3
    assert hbm_bytes(gather) == 3 * 64 + 12 + 60
    # the fused kernel reads the raw indices once, though three index ops read them
    reads, writes = kernel_reads_writes(kernel_op)
    by_operand = dict(zip((v.type.shape for v in kernel_op.operands), reads))
    assert by_operand[(3,)] == 12 and by_operand[(100, 5)] == 3 * 64
    assert writes == 60


def test_scatter_work_in_place_and_copied():
    f = lambda t, i, u: t.at[i].add(u)
    structs = (S((100, 5), F32), S((3,), jnp.int32), S((3, 5), F32))
    table, rows = 100 * 5 * 4, 3 * 64.0
    for donate, copy in (((0,), 0.0), ((), float(table))):
        compiled = _compiled(f, *structs, donate=donate)
        scatter = inner(ops_with(compiled.module.ops, "scatter-add")[0], "scatter-add")
        work = work_of(scatter)
        # a combining scatter reads the rows it updates (and the copy, if any)
        assert operand_reads(scatter, work) == (copy + rows, 12.0, 60.0)
        assert result_writes(scatter, work) == copy + rows
        assert work.random_accesses == 2 * 3  # read and write of each row
        assert work.flops == 15  # one add per update element


def test_slice_and_dynamic_update_slice_work():
    compiled = _compiled(lambda x: x[:, 1:3], S((16, 8), F32))
    (op,) = compiled.module.ops
    assert operand_reads(op, work_of(op)) == (16 * 2 * 4.0,)
    assert hbm_bytes(op) == 2 * 16 * 2 * 4
    f = lambda c, n, i: lax.dynamic_update_slice_in_dim(c, n, i, axis=0)
    structs = (S((16, 8), F32), S((2, 8), F32), S((), jnp.int32))
    for donate, rest in (((0,), 0.0), ((), (16 - 2) * 8 * 4.0)):
        module = _compiled(f, *structs, donate=donate).module
        (dus,) = [op for op in module.ops if op.kind == "dynamic_update_slice"]
        work = work_of(dus)
        assert operand_reads(dus, work) == (rest, 64.0, 0.0, 0.0)  # the indices are immediates
        assert result_writes(dus, work) == rest + 64.0


# ------------------------------------------------------------ in-place updates inside fused kernels
# (the update fused with its index arithmetic or carried by a loop: only the
# rows written count, as for a bare update)

def test_donated_scatter_fused_with_its_indices_counts_only_the_rows_written():
    f = lambda t, i, u: t.at[i].set(u)
    structs = (S((16, 8), F32), S((3,), jnp.int32), S((3, 8), F32))
    compiled = _compiled(f, *structs, donate=(0,))
    (kernel,) = kernels_with(compiled.cost.kernels, "scatter")
    assert kernel.kind.startswith("fused_kernel")
    # indices 12 + updates 96 read, 3 rows of one granule written; the table untouched
    assert kernel.hbm_bytes == 12 + 96 + 3 * 64
    assert floor_bytes(compiled.module) == 12 + 96 + 3 * 64


def test_donated_scatter_into_a_big_table_obeys_the_floor():
    f = lambda t, i, u: t.at[i].set(u)
    structs = (S((1 << 20, 128), F32), S((3,), jnp.int32), S((3, 128), F32))
    compiled = _compiled(f, *structs, donate=(0,))
    # 512-byte rows: 3 read from the updates, 3 written; 12 bytes of indices
    assert floor_bytes(compiled.module) == 12 + 2 * 3 * 128 * 4
    assert compiled.cost.total("hbm_bytes") == 12 + 2 * 3 * 128 * 4
    assert compiled.cost.time_s >= compiled.cost.roofline_time_s


def test_donated_cache_carried_by_a_scan_counts_the_rows_written_per_trip():
    L, B, T, D = 4, 2, 16, 8

    def f(cache, ks, pos):
        def body(c, xs):
            layer, k = xs
            return c.at[layer, :, pos].set(k), None
        return lax.scan(body, cache, (jnp.arange(L), ks))[0]

    structs = (S((L, B, T, D), F32), S((L, B, D), F32), S((), jnp.int32))
    compiled = _compiled(f, *structs, donate=(0,))
    new_rows, written = L * B * D * 4, L * B * ACCESS_GRANULE_BYTES
    assert compiled.cost.total("hbm_bytes") == new_rows + written
    assert floor_bytes(compiled.module) == new_rows + written
