"""embedding_bag (mtia_jax.primitives.embedding_bag) and its work rule
(runtime.accelerated.embedding).

Every mode and bag convention is checked against an independent NumPy loop
over bags; then jit, mtia_jax.jit, vmap over index sets, grads w.r.t. the
table and the per-sample weights, the checkify out-of-range check, argument
errors and the cost of a lookup by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads

import mtia_jax
from mtia_jax import chips
from mtia_jax.primitives.embedding_bag import embedding_bag

TOL = dict(rtol=1e-5, atol=1e-5)
MODES = ("sum", "mean", "max")


# ------------------------------------------------------------ NumPy reference

def numpy_bags(n_indices, offsets=None, lengths=None):
    """Index positions of every bag, by the PyTorch / TorchRec definitions."""
    if offsets is not None:
        ends = list(offsets[1:]) + [n_indices]
        return [list(range(start, end)) for start, end in zip(offsets, ends)]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    return [list(range(start, start + length)) for start, length in zip(starts, lengths)]


def numpy_embedding_bag(table, indices, offsets=None, lengths=None, mode="sum", weights=None):
    table = np.asarray(table, np.float64)
    indices = np.asarray(indices)
    weights = None if weights is None else np.asarray(weights, np.float64)
    if indices.ndim == 2:  # padded: one bag per row, -1 entries skipped
        bags = [[(b, j) for j in range(indices.shape[1])] for b in range(indices.shape[0])]
    else:
        bags = [[(p,) for p in bag] for bag in numpy_bags(indices.size, offsets, lengths)]
    out = np.zeros((len(bags), table.shape[1]))
    for b, bag in enumerate(bags):
        rows = []
        for pos in bag:
            i = int(indices[pos])
            if 0 <= i < table.shape[0]:  # -1 padding and out-of-range entries are skipped
                rows.append(table[i] * (1.0 if weights is None else weights[pos]))
        if rows:
            out[b] = {"sum": np.sum, "mean": np.mean, "max": np.max}[mode](rows, axis=0)
    return out


def _table(seed, n=10, d=4, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, d)), jnp.float32).astype(dtype)


INDICES = np.array([1, 2, 3, 9, 0, 5, 5, 7], np.int32)
OFFSETS = np.array([0, 2, 2, 5, 8], np.int32)       # bags of 2, 0, 3, 3, 0 entries
LENGTHS = np.array([2, 0, 3, 0, 2], np.int32)       # sums to 7: the last index is not in a bag
PADDED = np.array([[1, 2, -1, -1], [-1, -1, -1, -1], [3, 9, 0, 0], [5, -1, 7, -1]], np.int32)


# ------------------------------------------------------------ numerics

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("convention", ["offsets", "lengths", "padded"])
def test_every_mode_and_convention_matches_numpy(mode, convention):
    table = _table(0)
    if convention == "padded":
        got, want = embedding_bag(table, PADDED, mode=mode), numpy_embedding_bag(table, PADDED, mode=mode)
    else:
        kw = {convention: {"offsets": OFFSETS, "lengths": LENGTHS}[convention]}
        got = embedding_bag(table, INDICES, mode=mode, **kw)
        want = numpy_embedding_bag(table, INDICES, mode=mode, **kw)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(np.asarray(got)[1] == 0)  # bag 1 is empty in every convention


@pytest.mark.parametrize("convention", ["offsets", "lengths", "padded"])
def test_per_sample_weights(convention):
    table = _table(1)
    idx = PADDED if convention == "padded" else INDICES
    weights = np.random.default_rng(2).standard_normal(idx.shape).astype(np.float32)
    kw = {} if convention == "padded" else {convention: {"offsets": OFFSETS, "lengths": LENGTHS}[convention]}
    got = embedding_bag(table, idx, per_sample_weights=weights, **kw)
    np.testing.assert_allclose(got, numpy_embedding_bag(table, idx, weights=weights, **kw), **TOL)


def test_matches_torch_style_embedding_bag_of_one_index_per_bag():
    # bags of one index each: pooling is a plain lookup in every mode
    table = _table(3)
    idx = jnp.array([4, 0, 9, 4], jnp.int32)
    for mode in MODES:
        got = embedding_bag(table, idx, offsets=jnp.arange(4, dtype=jnp.int32), mode=mode)
        np.testing.assert_array_equal(got, table[idx])


def test_out_of_range_indices_contribute_nothing_by_default():
    table = _table(4)
    idx = np.array([1, 10, -3, 2, -1], np.int32)
    for mode in MODES:
        got = embedding_bag(table, idx, offsets=np.array([0, 3], np.int32), mode=mode)
        want = numpy_embedding_bag(table, idx, offsets=[0, 3], mode=mode)
        np.testing.assert_allclose(got, want, **TOL)
    # "mean" counts only the entries that were read
    np.testing.assert_allclose(embedding_bag(table, idx, offsets=np.array([0, 3]), mode="mean")[0],
                               table[1], **TOL)


def test_bf16_table_pools_in_fp32():
    table = _table(5, n=64, d=8, dtype=jnp.bfloat16)
    idx = np.arange(64, dtype=np.int32)
    got = embedding_bag(table, idx, offsets=np.array([0], np.int32))
    assert got.dtype == jnp.bfloat16
    want = np.sum(np.asarray(table, np.float32), axis=0, keepdims=True)  # fp32 sum, one rounding
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32))


@settings(max_examples=8, deadline=None)
@given(data=st.data(), n=st.integers(1, 12), d=st.integers(1, 5),
       bag_lengths=st.lists(st.integers(0, 4), min_size=1, max_size=5),
       mode=st.sampled_from(MODES), convention=st.sampled_from(["offsets", "lengths", "padded"]))
def test_random_bags_against_numpy(data, n, d, bag_lengths, mode, convention):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    table = _table(int(rng.integers(1 << 16)), n=n, d=d)
    total = sum(bag_lengths)
    if convention == "padded":
        width = max(max(bag_lengths), 1)
        idx = np.full((len(bag_lengths), width), -1, np.int32)
        for b, length in enumerate(bag_lengths):
            idx[b, :length] = rng.integers(0, n, length)
        got, want = embedding_bag(table, idx, mode=mode), numpy_embedding_bag(table, idx, mode=mode)
    else:
        idx = rng.integers(0, n, max(total, 1)).astype(np.int32)
        lengths = np.array(bag_lengths, np.int32)
        kw = ({"offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)}
              if convention == "offsets" else {"lengths": lengths})
        got = embedding_bag(table, idx, mode=mode, **kw)
        want = numpy_embedding_bag(table, idx, mode=mode, **kw)
    np.testing.assert_allclose(got, want, **TOL)


# ------------------------------------------------------------ transformations

def _lookup(table, idx, off, w):
    return (embedding_bag(table, idx, offsets=off, mode="mean")
            + embedding_bag(table, idx, offsets=off, per_sample_weights=w))


def test_jit_and_mtia_jit_match():
    table, w = _table(6), jnp.linspace(-1.0, 1.0, INDICES.size)
    args = (table, jnp.asarray(INDICES), jnp.asarray(OFFSETS), w)
    want = jax.jit(_lookup)(*args)
    np.testing.assert_allclose(want, _lookup(*args), **TOL)
    np.testing.assert_array_equal(mtia_jax.jit(_lookup)(*args), want)
    text = mtia_jax.jit(_lookup).lower(*args).as_text()
    assert text.count("embedding_bag(") == 2 and "layout=offsets" in text
    assert "gather(" not in text and "scatter" not in text


def test_vmap_over_index_sets_is_one_kernel():
    table = _table(7)
    rng = np.random.default_rng(8)
    idx = jnp.asarray(rng.integers(0, 10, (3, 8)), jnp.int32)
    segments = {"offsets": jnp.asarray([[0, 2, 2, 5, 8], [0, 0, 4, 4, 6], [0, 1, 2, 3, 4]], jnp.int32),
                "lengths": jnp.asarray([[2, 0, 3, 0, 3], [0, 4, 0, 2, 1], [1, 1, 1, 1, 1]], jnp.int32)}
    for kw_name, offs in segments.items():
        fn = lambda i, o: embedding_bag(table, i, mode="sum", **{kw_name: o})
        got = jax.vmap(fn)(idx, offs)
        want = np.stack([numpy_embedding_bag(table, i, mode="sum", **{kw_name: o})
                         for i, o in zip(np.asarray(idx), np.asarray(offs))])
        np.testing.assert_allclose(got, want, **TOL)
        prims = [q.primitive.name for q in jax.make_jaxpr(jax.vmap(fn))(idx, offs).eqns]
        assert prims.count("embedding_bag") == 1 and "gather" not in prims
    # padded index sets, mapped on axis 1, one weights vector shared by all
    padded = jnp.stack([PADDED, PADDED[::-1]], axis=1)
    got = jax.vmap(lambda i: embedding_bag(table, i, mode="max"), in_axes=1)(padded)
    want = np.stack([numpy_embedding_bag(table, p, mode="max") for p in (PADDED, PADDED[::-1])])
    np.testing.assert_allclose(got, want, **TOL)


def test_vmap_over_tables_matches_numpy():
    tables = jnp.stack([_table(9), _table(10)])
    fn = lambda t: embedding_bag(t, INDICES, lengths=LENGTHS, mode="mean")
    want = np.stack([numpy_embedding_bag(t, INDICES, lengths=LENGTHS, mode="mean") for t in tables])
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(tables), want, **TOL)


def test_mtia_jit_of_vmap_over_index_sets():
    table = _table(11)
    idx = jnp.asarray(np.random.default_rng(12).integers(0, 10, (4, 2, 3)), jnp.int32)
    fn = jax.vmap(lambda i: embedding_bag(table, i, mode="sum"))
    np.testing.assert_array_equal(mtia_jax.jit(fn)(idx), jax.jit(fn)(idx))


@pytest.mark.parametrize("mode", MODES)
def test_grad_wrt_table(mode):
    table = _table(13) + jnp.arange(40.0).reshape(10, 4) * 0.1  # distinct values: no ties for max
    check_grads(jax.jit(lambda t: embedding_bag(t, INDICES, offsets=OFFSETS, mode=mode)), (table,),
                order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(lambda t: embedding_bag(t, PADDED, mode=mode)), (table,), order=1, modes=("rev",))


def test_grad_wrt_table_and_weights():
    table, w = _table(14), jnp.linspace(0.5, 2.0, INDICES.size)
    fn = lambda t, w: embedding_bag(t, INDICES, lengths=LENGTHS, per_sample_weights=w)
    check_grads(jax.jit(fn), (table, w), order=1, modes=("fwd", "rev"))
    # d sum(pooled) / d table[i] = total weight of the entries reading row i inside a bag
    g = jax.jit(jax.grad(lambda t: jnp.sum(fn(t, w))))(table)
    counted = np.zeros(10)
    np.add.at(counted, INDICES[:LENGTHS.sum()], np.asarray(w)[:LENGTHS.sum()])
    np.testing.assert_allclose(g, np.repeat(counted[:, None], 4, axis=1), **TOL)


def test_grad_under_mtia_jit():
    table, w = _table(15), jnp.linspace(-1.0, 1.0, INDICES.size)
    args = (table, jnp.asarray(INDICES), jnp.asarray(OFFSETS), w)
    grad = jax.grad(lambda t, i, o, w: jnp.sum(_lookup(t, i, o, w) ** 2), argnums=(0, 3))
    for got, want in zip(mtia_jax.jit(grad)(*args), jax.jit(grad)(*args)):
        np.testing.assert_allclose(got, want, **TOL)


# ------------------------------------------------------------ out-of-range check

def test_checkify_raises_on_out_of_range_indices():
    table = _table(16)
    fn = checkify.checkify(jax.jit(lambda t, i: embedding_bag(t, i, offsets=OFFSETS)),
                           errors=checkify.index_checks)
    err, _ = fn(table, jnp.asarray(INDICES))
    assert err.get() is None
    err, out = fn(table, jnp.asarray(INDICES).at[3].set(12))
    with pytest.raises(checkify.JaxRuntimeError, match=r"shape \(10, 4\): index 12 is out of bounds"):
        err.throw()
    # the result is still defined: the bad entry was dropped
    np.testing.assert_allclose(out, numpy_embedding_bag(table, np.where(INDICES == 9, 12, INDICES),
                                                        offsets=OFFSETS), **TOL)


def test_checkify_accepts_padding_and_skips_entries_outside_bags():
    table = _table(17)
    padded = checkify.checkify(jax.jit(lambda i: embedding_bag(table, i)), errors=checkify.index_checks)
    assert padded(jnp.asarray(PADDED))[0].get() is None
    err, _ = padded(jnp.asarray(PADDED).at[0, 3].set(-2))
    assert "index -2 is out of bounds" in err.get()
    # lengths: the last index (position 7) is in no bag, so it is never read
    jagged = checkify.checkify(jax.jit(lambda i: embedding_bag(table, i, lengths=LENGTHS)),
                               errors=checkify.index_checks)
    assert jagged(jnp.asarray(INDICES).at[7].set(99))[0].get() is None
    assert jagged(jnp.asarray(INDICES).at[6].set(99))[0].get() is not None


# ------------------------------------------------------------ errors

@pytest.mark.parametrize("call, message", [
    (lambda: embedding_bag(_table(0), INDICES), "1-D indices .* need offsets= or lengths="),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS, lengths=LENGTHS),
     "give offsets .* or lengths .*, not both"),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS[None]),
     r"offsets must be 1-D \(bags,\), got shape \(1, 5\)"),
    (lambda: embedding_bag(_table(0), INDICES, lengths=np.zeros((2, 2), np.int32)),
     r"lengths must be 1-D \(bags,\)"),
    (lambda: embedding_bag(_table(0), PADDED, offsets=OFFSETS), "2-D indices .* are padded bags"),
    (lambda: embedding_bag(_table(0), INDICES[None, None]), "indices must be 1-D .* or 2-D"),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS, mode="min"),
     "mode must be one of 'sum', 'mean', 'max', got 'min'"),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS, mode="mean",
                           per_sample_weights=np.ones(8, np.float32)),
     "per_sample_weights are only supported with mode='sum'"),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS,
                           per_sample_weights=np.ones(7, np.float32)),
     r"per_sample_weights must have the shape of indices \(8,\), got shape \(7,\)"),
    (lambda: embedding_bag(jnp.ones((10,)), INDICES, offsets=OFFSETS), r"table must be 2-D \(N, D\)"),
    (lambda: embedding_bag(jnp.ones((0, 4)), INDICES, offsets=OFFSETS), "table must have at least one row"),
])
def test_bad_shapes_and_values_raise_value_errors_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: embedding_bag(_table(0), INDICES.astype(np.float32), offsets=OFFSETS),
     "indices must be an integer array, got dtype float32"),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS.astype(np.float32)),
     "offsets must be an integer array"),
    (lambda: embedding_bag(jnp.ones((10, 4), jnp.int32), INDICES, offsets=OFFSETS),
     "table must be a floating-point array"),
    (lambda: embedding_bag(_table(0), INDICES, offsets=OFFSETS,
                           per_sample_weights=np.ones(8, np.int32)),
     "per_sample_weights must be a floating-point array"),
])
def test_non_integer_indices_and_integer_weights_raise_type_errors(call, message):
    with pytest.raises(TypeError, match=message):
        call()


# ------------------------------------------------------------ cost rule

def _kernel(chip, *structs, **kw):
    fn = lambda t, i, *rest: embedding_bag(t, i, **dict(zip(kw.get("names", ()), rest)),
                                           mode=kw.get("mode", "sum"))
    compiled = mtia_jax.jit(fn, chip=chip).lower(*structs).compile()
    (kernel,) = [k for k in compiled.cost.kernels if k.kind == "embedding_bag"]
    return kernel


@pytest.mark.parametrize("chip_name", ["mtia450", "mtia_v2i"])
def test_cost_rows_as_random_accesses(chip_name):
    chip = chips.get(chip_name)
    n, d, nnz, bags = 100_000, 20, 4096, 512
    s = jax.ShapeDtypeStruct
    kernel = _kernel(chip_name, s((n, d), jnp.float32), s((nnz,), jnp.int32), s((bags,), jnp.int32),
                     names=("offsets",))
    row = 128  # 20 x 4 = 80 bytes -> two 64-byte granules
    gathered = nnz * row
    streamed = nnz * 4 + bags * 4 + bags * d * 4  # indices, offsets, pooled output
    assert kernel.hbm_bytes == gathered + streamed  # the table itself is never streamed
    # each row read at random pays one access overhead: with efficiency e for
    # one-granule reads, (1 / e - 1) granules of 64 bytes
    overhead = nnz * 64 * (1 / chip.hbm_random_access_efficiency - 1)
    assert kernel.hbm_s == pytest.approx(
        (gathered + overhead + streamed) / (chip.hbm_bandwidth * chip.hbm_efficiency))
    assert kernel.flops == nnz * d
    assert kernel.compute_s == pytest.approx(nnz * d / chip.vector_peak(jnp.float32))


def test_cost_of_padded_weighted_and_mean_lookups():
    s = jax.ShapeDtypeStruct
    table, padded = s((1000, 64), jnp.bfloat16), s((32, 10), jnp.int32)
    kernel = _kernel("mtia450", table, padded, mode="mean")
    assert kernel.flops == 320 * 64 + 32 * 64  # an add per gathered element, a divide per output
    assert kernel.hbm_bytes == 320 * 128 + 320 * 4 + 32 * 64 * 2  # 128-byte rows: exact granules
    weighted = mtia_jax.jit(lambda t, i, w: embedding_bag(t, i, per_sample_weights=w)).lower(
        table, padded, s((32, 10), jnp.float32)).compile().cost.kernels
    (k,) = [k for k in weighted if k.kind == "embedding_bag"]
    assert k.flops == 2 * 320 * 64
    assert k.hbm_bytes == 320 * 128 + 320 * 4 + 320 * 4 + 32 * 64 * 2


def test_every_chip_has_a_sourced_random_access_efficiency():
    for spec in chips.specs():
        assert 0 < spec.hbm_random_access_efficiency <= 1
        assert spec.sources["hbm_random_access_efficiency"].startswith("assumption")
    with pytest.raises(ValueError, match="hbm_random_access_efficiency"):
        chips.get("mtia450").replace(hbm_random_access_efficiency=1.5)
