"""``lowering.passes.inplace``: which updates write into their operand's buffer,
and which loops copy their carried state first; the bytes the cost model
charges for each decision, and numerics equal to ``jax.jit``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from kernels import kernels_with
from lowering.from_jaxpr import import_closed_jaxpr
from lowering.passes import fusion, prologue
from lowering.passes.inplace import UPDATE_KINDS
from lowering.pipeline import PASSES, PassContext, run_passes
from mtia_jax import chips

S = jax.ShapeDtypeStruct
F32 = jnp.float32
CACHE, ROW, INDEX = S((16, 8), F32), S((1, 8), F32), S((), jnp.int32)
CACHE_BYTES, ROW_BYTES = 16 * 8 * 4, 8 * 4


def _compiled(f, *structs, donate=()):
    return mtia_jax.jit(f, chip="mtia450", donate_argnums=donate).lower(*structs).compile()


def _updates(module) -> list:
    """Every update op of ``module``, its fused kernels' bodies and its regions."""
    found = []
    for op in module.ops:
        if op.kind in UPDATE_KINDS:
            found.append(op)
        for region in op.regions.values():
            found += _updates(region)
    return found


def _region_ops(module, kind) -> list:
    return [op for op in module.ops if op.kind == kind]


def _dus(c, n, i):
    return lax.dynamic_update_slice_in_dim(c, n, i, axis=0)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((16, 8)).astype(np.float32),
            rng.standard_normal((1, 8)).astype(np.float32))


def _check_numerics(f, compiled, *args):
    want = jax.jit(f)(*[np.copy(a) for a in args])  # before the compiled call consumes donations
    got = compiled(*[np.copy(a) for a in args])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


# ------------------------------------------------------------ dynamic_update_slice

def test_dus_of_a_donated_buffer_is_in_place_and_moves_only_the_row():
    compiled = _compiled(_dus, CACHE, ROW, INDEX, donate=(0,))
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is True
    assert "in_place=True" in compiled.as_text()
    (kernel,) = compiled.cost.kernels
    assert kernel.kind == "dynamic_update_slice"
    assert kernel.hbm_bytes == 2 * ROW_BYTES  # the row read and written; the rest stays put
    cache, row = _data()
    _check_numerics(_dus, compiled, cache, row, np.int32(5))


def test_dus_of_a_buffer_the_caller_keeps_copies_it():
    compiled = _compiled(_dus, CACHE, ROW, INDEX)
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False
    (kernel,) = compiled.cost.kernels
    # the rest of the cache (15 rows) read and written around the new row
    rest = CACHE_BYTES - ROW_BYTES
    assert kernel.hbm_bytes == 2 * rest + 2 * ROW_BYTES == 2 * CACHE_BYTES
    cache, row = _data()
    _check_numerics(_dus, compiled, cache, row, np.int32(-3))


@pytest.mark.parametrize("name, f", [
    ("read later", lambda c, n, i: (_dus(c, n, i), c.sum())),
    ("read later through a view", lambda c, n, i: (_dus(c, n, i), c[0] * 2)),
    ("returned", lambda c, n, i: (_dus(c, n, i), c)),
    ("a view of it returned", lambda c, n, i: (_dus(c, n, i), c[3])),
])
def test_dus_copies_a_donated_operand_still_needed(name, f):
    compiled = _compiled(f, CACHE, ROW, INDEX, donate=(0,))
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False, name
    (kernel,) = kernels_with(compiled.cost.kernels, "dynamic_update_slice")
    assert kernel.hbm_bytes == 2 * CACHE_BYTES
    cache, row = _data(1)
    _check_numerics(f, compiled, cache, row, np.int32(2))


def test_dus_after_the_last_read_of_its_operand_is_in_place():
    def f(c, n, i):
        total = c.sum()  # read before the update: the update may then overwrite c
        return _dus(c, n, i), total
    compiled = _compiled(f, CACHE, ROW, INDEX, donate=(0,))
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is True
    (kernel,) = kernels_with(compiled.cost.kernels, "dynamic_update_slice")
    assert kernel.hbm_bytes == 2 * ROW_BYTES
    cache, row = _data(2)
    _check_numerics(f, compiled, cache, row, np.int32(7))


def test_chained_updates_of_a_donated_buffer_are_in_place_before_fusion():
    # each update's operand is the previous update's result, in the donated
    # buffer: both write in place (the passes up to fusion, then inplace)
    f = lambda c, n, i: _dus(_dus(c, n, i), n * 2, i + 1)
    module = import_closed_jaxpr(jax.make_jaxpr(f)(CACHE, ROW, INDEX))
    passes = tuple(p for p in PASSES if p not in (fusion, prologue))
    module = run_passes(module, PassContext(chip=chips.get("mtia450"), donated=frozenset({0})),
                        passes)
    updates = _updates(module)
    assert [u.attrs["in_place"] for u in updates] == [True, True]


def test_chained_updates_fused_into_one_kernel_are_in_place():
    f = lambda c, n, i: _dus(_dus(c, n, i), n * 2, i + 1)
    compiled = _compiled(f, CACHE, ROW, INDEX, donate=(0,))
    assert [u.attrs["in_place"] for u in _updates(compiled.module)] == [True, True]
    # the update row is read once (both updates and the doubling read it),
    # and no part of the cache is copied
    (kernel,) = kernels_with(compiled.cost.kernels, "dynamic_update_slice")
    assert kernel.hbm_bytes < CACHE_BYTES


def test_chained_updates_numerics():
    f = lambda c, n, i: _dus(_dus(c, n, i), n * 2, i + 1)
    for donate in ((), (0,)):
        compiled = _compiled(f, CACHE, ROW, INDEX, donate=donate)
        cache, row = _data(3)
        _check_numerics(f, compiled, cache, row, np.int32(4))


# ------------------------------------------------------------ scatter

TABLE, IDX, UPD = S((16, 8), F32), S((3,), jnp.int32), S((3, 8), F32)
# 3 rows of 32 bytes, each a whole 64-byte access granule when scattered
ROWS_WRITTEN = 3 * 64
IDX_BYTES, UPD_BYTES = 3 * 4, 3 * 8 * 4


def _scatter_data():
    rng = np.random.default_rng(4)
    return (rng.standard_normal((16, 8)).astype(np.float32), np.array([5, 0, -1], np.int32),
            rng.standard_normal((3, 8)).astype(np.float32))


@pytest.mark.parametrize("f, kind, rows_moved", [
    # indices and updates read, the rows written (granules); the table untouched
    (lambda t, ix, u: t.at[ix].set(u), "scatter", ROWS_WRITTEN),
    # a combining scatter also reads the rows it updates
    (lambda t, ix, u: t.at[ix].add(u), "scatter-add", 2 * ROWS_WRITTEN),
], ids=["set", "add"])
def test_scatter_into_a_donated_buffer_is_in_place(f, kind, rows_moved):
    compiled = _compiled(f, TABLE, IDX, UPD, donate=(0,))
    (update,) = _updates(compiled.module)
    assert update.kind == kind and update.attrs["in_place"] is True
    (kernel,) = kernels_with(compiled.cost.kernels, kind)
    assert kernel.hbm_bytes == IDX_BYTES + UPD_BYTES + rows_moved
    _check_numerics(f, compiled, *_scatter_data())


def test_scatter_into_a_buffer_the_caller_keeps_copies_it():
    f = lambda t, ix, u: t.at[ix].set(u)
    compiled = _compiled(f, TABLE, IDX, UPD)
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False
    (kernel,) = kernels_with(compiled.cost.kernels, "scatter")
    # the table copied (read + written), then the rows written over the copy
    assert kernel.hbm_bytes == 2 * CACHE_BYTES + IDX_BYTES + UPD_BYTES + ROWS_WRITTEN
    _check_numerics(f, compiled, *_scatter_data())


def test_scatter_copies_a_donated_table_that_is_read_later():
    f = lambda t, ix, u: (t.at[ix].set(u), t.max())
    compiled = _compiled(f, TABLE, IDX, UPD, donate=(0,))
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False
    (kernel,) = kernels_with(compiled.cost.kernels, "scatter")
    assert kernel.hbm_bytes == 2 * CACHE_BYTES + IDX_BYTES + UPD_BYTES + ROWS_WRITTEN
    _check_numerics(f, compiled, *_scatter_data())


# ------------------------------------------------------------ loops

L, B, T, D = 4, 2, 16, 8
KV = S((L, B, T, D), F32)
KV_BYTES = L * B * T * D * 4
NEW_K = S((L, B, D), F32)


def _scan_cache(cache, ks, pos):
    """One row per sequence and layer written into a cache carried over the layers."""
    def body(c, xs):
        layer, k = xs
        return c.at[layer, :, pos].set(k), None
    return lax.scan(body, cache, (jnp.arange(L), ks))[0]


def _assert_updated_in_place_without_a_copy(compiled, loop_kind: str):
    (loop,) = _region_ops(compiled.module, loop_kind)
    assert "copied_carries" not in loop.attrs
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is True
    assert not [k for k in compiled.cost.kernels if k.kind == "copy"]


def _kv_data():
    rng = np.random.default_rng(5)
    return (rng.standard_normal((L, B, T, D)).astype(np.float32),
            rng.standard_normal((L, B, D)).astype(np.float32), np.int32(9))


def test_scan_updates_a_donated_cache_in_place_without_a_copy():
    compiled = _compiled(_scan_cache, KV, NEW_K, INDEX, donate=(0,))
    _assert_updated_in_place_without_a_copy(compiled, "scan")
    (kernel,) = compiled.cost.kernels
    # per layer: the new rows read (B x D f32) and written as B scattered
    # 32-byte runs, one 64-byte granule each
    assert kernel.count == L
    assert kernel.hbm_bytes == L * (B * D * 4 + B * 64)
    _check_numerics(_scan_cache, compiled, *_kv_data())


def test_scan_copies_a_cache_the_caller_keeps_once_before_the_first_trip():
    compiled = _compiled(_scan_cache, KV, NEW_K, INDEX)
    (scan,) = _region_ops(compiled.module, "scan")
    # operands: (pos,) consts, then the carried cache at index 1
    assert scan.params["num_consts"] == 1
    assert scan.attrs["copied_carries"] == (1,)
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is True  # inside the loop: the loop's own copy
    (copy,) = [k for k in compiled.cost.kernels if k.kind == "copy"]
    assert copy.path.endswith("/copy1") and copy.path == "1/copy1"
    assert copy.count == 1
    assert copy.hbm_bytes == 2 * KV_BYTES  # the whole cache read and written once
    (body,) = kernels_with(compiled.cost.kernels, "scatter")
    assert body.hbm_bytes == L * (B * D * 4 + B * 64)
    _check_numerics(_scan_cache, compiled, *_kv_data())


def test_scan_body_reading_the_cache_after_its_update_copies_every_trip():
    def f(cache, ks, pos):
        def body(c, xs):
            layer, k = xs
            return c.at[layer, :, pos].set(k), c.sum()
        return lax.scan(body, cache, (jnp.arange(L), ks))
    compiled = _compiled(f, KV, NEW_K, INDEX, donate=(0,))
    (scan,) = _region_ops(compiled.module, "scan")
    assert "copied_carries" not in scan.attrs  # the body does not update it in place
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False
    (kernel,) = kernels_with(compiled.cost.kernels, "scatter")
    assert kernel.hbm_bytes == L * (2 * KV_BYTES + B * D * 4 + B * 64)
    _check_numerics(f, compiled, *_kv_data())


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_loop_body_does_not_own_its_consts_or_xs():
    # a scan's consts and its xs slices are the caller's, donated or not
    def updates_const(tbl, xs):
        def body(carry, x):
            return carry + tbl.at[0].set(x).sum(), None
        return lax.scan(body, 0.0, xs)[0]

    def updates_slice(xs):
        def body(carry, x):
            return carry + x.at[0].set(1.0).sum(), None
        return lax.scan(body, 0.0, xs)[0]

    rng = np.random.default_rng(6)
    tbl, xs = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    compiled = _compiled(updates_const, TABLE, S((3, 8), F32), donate=(0, 1))
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False
    (kernel,) = kernels_with(compiled.cost.kernels, "scatter")
    # per trip: the table copied, one 32-byte row (one granule) written, the row read
    assert kernel.hbm_bytes == 3 * (2 * CACHE_BYTES + 64 + 32)
    np.testing.assert_allclose(compiled(tbl, xs), jax.jit(updates_const)(tbl, xs), rtol=1e-6)

    compiled = _compiled(updates_slice, S((3, 8), F32), donate=(0,))
    (update,) = _updates(compiled.module)
    assert update.attrs["in_place"] is False
    np.testing.assert_allclose(compiled(xs), jax.jit(updates_slice)(xs), rtol=1e-6)


def _while_cache(c, ks, n):
    def body(state):
        layer, c = state
        return layer + 1, lax.dynamic_update_slice_in_dim(c, ks[layer][None], layer, 0)
    return lax.while_loop(lambda s: s[0] < n, body, (0, c))[1]


def test_while_loop_updates_a_donated_buffer_in_place():
    compiled = _compiled(_while_cache, CACHE, CACHE, INDEX, donate=(0,))
    _assert_updated_in_place_without_a_copy(compiled, "while")
    cache, ks = _data(7)[0], np.arange(128, dtype=np.float32).reshape(16, 8)
    _check_numerics(_while_cache, compiled, cache, ks, np.int32(5))
    (kernel,) = kernels_with(compiled.cost.kernels, "dynamic_update_slice")
    assert kernel.count == 5  # the measured trips
    assert kernel.hbm_bytes == 5 * 2 * ROW_BYTES


def test_while_loop_copies_a_buffer_the_caller_keeps():
    compiled = _compiled(_while_cache, CACHE, CACHE, INDEX)
    (loop,) = _region_ops(compiled.module, "while")
    # operands: cond consts (n), body consts (ks), then the carries (layer, cache)
    assert loop.params["cond_nconsts"] == 1 and loop.params["body_nconsts"] == 1
    assert loop.attrs["copied_carries"] == (3,)
    (copy,) = [k for k in compiled.cost.kernels if k.kind == "copy"]
    assert copy.path.endswith("/copy3")
    assert copy.hbm_bytes == 2 * CACHE_BYTES and copy.count == 1
    cache, ks = _data(8)[0], np.arange(128, dtype=np.float32).reshape(16, 8)
    _check_numerics(_while_cache, compiled, cache, ks, np.int32(6))
