"""The Llama-style decoder (models/transformer.py): RoPE frequencies against an
independent implementation of Meta's formula, the model against a NumPy
reference, mtia_jax.jit against jax.jit, KV-cache decode against full
recomputation, padded batches against single sequences, the MoE variant, the
sharded model on a 2x4 mesh, and estimate() of the published shapes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtia_jax
from models import transformer as tf
from models.transformer import Config
from kernels import inner, ops_with

TINY = Config.preset("tiny")
TINY_MOE = Config.preset("tiny-moe")


def _perturbed_model(cfg, seed=0):
    """A model whose norm weights are not all ones (so a misplaced norm shows)."""
    model = tf.Transformer(cfg, rngs=nnx.Rngs(seed))
    params = model.params()
    key = jax.random.PRNGKey(seed + 100)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * jax.random.normal(jax.random.fold_in(key, len(str(path))), a.shape)
        if "norm" in jax.tree_util.keystr(path) else a, params)
    return tf.Transformer.from_params(cfg, params)


@pytest.fixture(scope="module")
def tiny():
    return _perturbed_model(TINY)


@functools.lru_cache(maxsize=None)
def _jit(fn, cfg):
    """``jax.jit(partial(fn, cfg))``, one per (function, config) for the whole file."""
    return jax.jit(functools.partial(fn, cfg))


def _tokens(shape, seed=1, vocab=256):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab, dtype=jnp.int32)


# ------------------------------------------------------------ RoPE

def _meta_apply_scaling(freqs, factor, low, high, old_context):
    """Meta's llama-models ``apply_scaling``, as a plain loop."""
    low_wavelen, high_wavelen = old_context / low, old_context / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_rope_frequencies_match_metas_llama3_scaling():
    cfg = Config.preset("llama3-8b")
    dim = cfg.head_dim
    base = [1.0 / 500000.0 ** (2 * i / dim) for i in range(dim // 2)]
    want = _meta_apply_scaling(base, 8.0, 1.0, 4.0, 8192)
    got = tf.rope_frequencies(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # all three bands occur for head_dim 128: kept, scaled by 1/8, interpolated
    assert np.sum(got == np.array(base)) > 0 and np.sum(np.isclose(got, np.array(base) / 8)) > 0
    assert np.sum(~np.isclose(got, base) & ~np.isclose(got, np.array(base) / 8)) > 0
    # without scaling (Mixtral): the plain theta ** (-2i/d)
    mix = Config.preset("mixtral-8x7b")
    np.testing.assert_allclose(tf.rope_frequencies(mix),
                               [1.0 / 1e6 ** (2 * i / 128) for i in range(64)], rtol=1e-12)


def test_apply_rope_is_a_complex_rotation_of_the_two_halves():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 8)))
    pos = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 100]])
    inv = tf.rope_frequencies(TINY)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, :, None, None] * inv)
    got = np.asarray(jax.jit(tf.apply_rope)(jnp.asarray(x), jnp.asarray(pos), inv))
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ the model vs NumPy

def _numpy_forward(cfg, params, tokens):
    """Independent NumPy float64 forward pass of one sequence (T,) -> (T, V)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    t, hd = len(tokens), cfg.head_dim

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    def rope(x):  # (T, heads, hd), pairs (i, i + hd/2)
        ang = np.arange(t)[:, None] * tf.rope_frequencies(cfg)[None, :]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    x = p["embed"][np.asarray(tokens)]
    for i in range(cfg.layers):
        w = {k: v[i] for k, v in p["layers"].items()}
        h = norm(x, w["attn_norm"])
        q = rope((h @ w["wq"]).reshape(t, cfg.heads, hd))
        k = rope((h @ w["wk"]).reshape(t, cfg.kv_heads, hd))
        v = (h @ w["wv"]).reshape(t, cfg.kv_heads, hd)
        group = cfg.heads // cfg.kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(t, -1) @ w["wo"]
        h = norm(x, w["mlp_norm"])
        g = h @ w["w_gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ w["w_up"])) @ w["w_down"]
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return norm(x, p["final_norm"]) @ head


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_an_independent_numpy_model(tied):
    cfg = TINY.replace(tie_embeddings=tied)
    model = _perturbed_model(cfg, seed=3)
    assert ("lm_head" in model.params()) is not tied
    tokens = _tokens((1, 11))  # the shape the recomputation test compiles
    got = _jit(tf.forward, cfg)(model.params(), tokens)[0]
    np.testing.assert_allclose(got[0], _numpy_forward(cfg, model.params(), tokens[0]),
                               rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------ mtia_jax.jit == jax.jit

def test_prefill_and_decode_under_mtia_jit_equal_jax_jit(tiny):
    params = tiny.params()
    tokens, lengths = _tokens((2, 7)), jnp.array([7, 4], jnp.int32)
    cache = tf.init_cache(TINY, 2, 16)
    pre = functools.partial(tf.prefill, TINY)
    want_logits, want_cache = jax.jit(pre)(params, tokens, lengths, cache)
    got_logits, got_cache = mtia_jax.jit(pre, chip="mtia450")(params, tokens, lengths, cache)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    for name in ("k", "v", "lengths"):
        np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=1e-6, atol=1e-6)

    dec = functools.partial(tf.decode, TINY)
    next_tokens = jnp.array([5, 11], jnp.int32)
    want, want_cache = jax.jit(dec)(params, next_tokens, want_cache)
    got, got_cache = mtia_jax.jit(dec, chip="mtia450")(params, next_tokens, got_cache)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_cache["lengths"], [8, 5])


# ------------------------------------------------------------ KV cache

def _greedy(cfg, params, tokens, lengths, steps, capacity=24):
    """Prefill then ``steps`` greedy decode steps; (generated (B, steps), decode logits)."""
    pre, dec = _jit(tf.prefill, cfg), _jit(tf.decode, cfg)
    logits, cache = pre(params, tokens, lengths, tf.init_cache(cfg, tokens.shape[0], capacity))
    nxt = jnp.argmax(tf.last_token_logits(logits, lengths), -1).astype(jnp.int32)
    generated, step_logits = [nxt], []
    for _ in range(steps):
        logits, cache = dec(params, nxt, cache)
        step_logits.append(logits)
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        generated.append(nxt)
    return np.stack(generated[:-1], 1), np.stack(step_logits, 1), cache


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_kv_cache_decode_equals_full_recomputation(cfg):
    model = _perturbed_model(cfg, seed=5)
    params = model.params()
    prompt = _tokens((1, 6), seed=2)
    generated, step_logits, cache = _greedy(cfg, params, prompt, jnp.array([6]), steps=5)
    assert int(cache["lengths"][0]) == 11
    full = np.concatenate([np.asarray(prompt[0]), generated[0]])
    logits = np.asarray(_jit(tf.forward, cfg)(params, full[None])[0][0])
    # decode step j sees positions 0..6+j: the recomputed logits at position 6+j
    np.testing.assert_allclose(step_logits[0], logits[6:11], rtol=2e-5, atol=2e-5)
    # greedy tokens: each generated token is the argmax of the recomputed logits before it
    np.testing.assert_array_equal(generated[0], np.argmax(logits[5:10], -1))


def test_padded_batch_equals_each_sequence_alone(tiny):
    params = tiny.params()
    lengths = [7, 4]
    prompts = [_tokens((n,), seed=10 + i) for i, n in enumerate(lengths)]
    batch = jnp.stack([jnp.pad(p, (0, 7 - len(p)), constant_values=255) for p in prompts])
    gen, logits, _ = _greedy(TINY, params, batch, jnp.array(lengths, jnp.int32), steps=4)
    pre = _jit(tf.prefill, TINY)
    batch_prefill, _ = pre(params, batch, jnp.array(lengths, jnp.int32), tf.init_cache(TINY, 2, 24))
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        alone_prefill, _ = pre(params, prompt[None], jnp.array([n]), tf.init_cache(TINY, 1, 24))
        np.testing.assert_allclose(batch_prefill[i, :n], alone_prefill[0], rtol=2e-5, atol=2e-5)
        gen_alone, logits_alone, _ = _greedy(TINY, params, prompt[None], jnp.array([n]), steps=4)
        np.testing.assert_array_equal(gen[i], gen_alone[0])
        np.testing.assert_allclose(logits[i], logits_alone[0], rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------ MoE

def test_moe_model_under_mtia_jit_equals_jax_jit_and_routes_like_mixtral():
    model = _perturbed_model(TINY_MOE, seed=7)
    params = model.params()
    assert params["layers"]["w_gate"].shape == (2, 4, 64, 64)
    tokens = _tokens((1, 11), seed=4)  # the shape the recomputation test compiles
    got = mtia_jax.jit(functools.partial(tf.forward, TINY_MOE))(params, tokens)[0]
    want = _jit(tf.forward, TINY_MOE)(params, tokens)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the MoE MLP equals a dense "all experts, keep the top 2 with renormalized softmax" sum
    w = jax.tree.map(lambda a: np.asarray(a[0], np.float64), params["layers"])
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 6, 64)))
    mlp = jax.jit(lambda w, h: tf._mlp(TINY_MOE, w, h))
    got = np.asarray(mlp(jax.tree.map(lambda a: a[0], params["layers"]), jnp.asarray(x, jnp.float32)))[0]
    logits = x[0] @ w["router"]
    want = np.zeros((6, 64))
    for t in range(6):
        top = np.argsort(-logits[t])[:2]
        p = np.exp(logits[t, top] - logits[t, top].max())
        p /= p.sum()
        for e, pe in zip(top, p):
            g = x[0, t] @ w["w_gate"][e]
            want[t] += pe * ((g / (1 + np.exp(-g)) * (x[0, t] @ w["w_up"][e])) @ w["w_down"][e])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ sharding

def _sharded_decode_step_equals_unsharded(tiny, mesh, in_shardings) -> list:
    """A decode step of TINY after a 2-sequence prefill, sharded on ``mesh``,
    against jax.jit; returns the ops of the compiled layer scan's body."""
    params = tiny.params()
    tokens, lengths = _tokens((2, 6)), jnp.array([6, 2], jnp.int32)
    _, cache = _jit(tf.prefill, TINY)(params, tokens, lengths, tf.init_cache(TINY, 2, 8))
    dec = functools.partial(tf.decode, TINY)
    nxt = jnp.array([1, 2], jnp.int32)
    sharded = mtia_jax.jit(dec, in_shardings=in_shardings, mesh=mesh)
    got, got_cache = sharded(params, nxt, cache)
    want, want_cache = jax.jit(dec)(params, nxt, cache)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_cache["k"], want_cache["k"], rtol=1e-5, atol=1e-5)
    compiled = sharded.lower(params, nxt, cache).compile()
    (scan,) = [op for op in compiled.module.ops if op.kind == "scan"]
    return scan.regions["body"].ops


def test_tiny_model_sharded_on_a_2x4_mesh_equals_unsharded(tiny):
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    pspecs, cspecs, tspec = tf.shardings(TINY, mesh, batch=2)
    assert pspecs["layers"]["wq"] == tf.P(None, None, "model")
    assert pspecs["layers"]["wo"] == tf.P(None, "model", None)
    assert cspecs["k"] == tf.P(None, "data", None, "model", None)
    body = _sharded_decode_step_equals_unsharded(tiny, mesh, (pspecs, tspec, cspecs))
    # Megatron: attention runs on each device's heads, one all-reduce after each
    # of the attention output and MLP down projections
    (attn,) = [inner(op, "flash_attention") for op in ops_with(body, "flash_attention")]
    assert attn.operands[0].type.shape[2] == TINY.heads // 4
    reduces = [op for op in body if op.kind == "all_reduce"]
    assert len(reduces) == 2 and all(op.attrs["axes"] == ("model",) for op in reduces)


def test_more_devices_than_kv_heads_share_each_kv_head_and_equal_unsharded(tiny):
    """8-way tensor parallel over TINY's 4 KV heads: tensor_parallel_mesh makes
    ("data", "model", "rep") = (1, 4, 2); queries over ("model", "rep"), each
    KV head (and its cache) on the 2 devices whose query heads read it."""
    mesh = tf.tensor_parallel_mesh(TINY, 1, 8)
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 1, "model": 4, "rep": 2}
    pspecs, cspecs, tspec = tf.shardings(TINY, mesh, batch=2)
    assert pspecs["layers"]["wq"] == tf.P(None, None, ("model", "rep"))
    assert pspecs["layers"]["wk"] == tf.P(None, None, "model")
    assert cspecs["k"] == tf.P(None, None, None, "model", None)
    body = _sharded_decode_step_equals_unsharded(tiny, mesh, (pspecs, tspec, cspecs))
    # attention on one query head and its one KV head per device; two all-reduces per layer
    (attn,) = [inner(op, "flash_attention") for op in ops_with(body, "flash_attention")]
    assert (attn.operands[0].type.shape[2], attn.operands[1].type.shape[2]) == (TINY.heads // 8, 1)
    reduces = [op for op in body if op.kind == "all_reduce"]
    assert len(reduces) == 2 and all(op.attrs["axes"] == ("model", "rep") for op in reduces)
    assert not [op for op in body if op.kind == "all_gather"]


def test_shardings_replicate_axes_the_mesh_does_not_divide():
    cfg = Config.preset("llama3-70b")  # 8 KV heads
    mesh = mtia_jax.make_mesh((1, 16), ("data", "model"), chip="mtia400")
    pspecs, cspecs, tspec = tf.shardings(cfg, mesh, batch=4)
    assert pspecs["layers"]["wq"] == tf.P(None, None, "model")       # 64 heads split 16 ways
    assert pspecs["layers"]["wk"] == tf.P(None, None, None)           # 8 KV heads: replicated
    assert cspecs["k"] == tf.P(None, None, None, None, None)          # data axis of size 1
    moe = tf.shardings(Config.preset("mixtral-8x7b"), mesh, batch=4)[0]
    assert moe["layers"]["w_gate"] == tf.P(None, None, None, "model")  # expert FFN width


# ------------------------------------------------------------ presets and estimate

def test_presets_have_the_published_parameter_counts():
    def count(name):
        return sum(math.prod(s.shape) for s in jax.tree.leaves(tf.param_shapes(Config.preset(name))))
    # Llama 3 paper: 8B, 70B, 405B; Mixtral paper: 47B total parameters
    assert count("llama3-8b") == pytest.approx(8.03e9, rel=0.01)
    assert count("llama3-70b") == pytest.approx(70.6e9, rel=0.01)
    assert count("llama3-405b") == pytest.approx(405.9e9, rel=0.01)
    assert count("mixtral-8x7b") == pytest.approx(46.7e9, rel=0.01)


def test_estimate_of_a_llama3_8b_decode_step_runs_from_shapes_and_is_bounded_by_weight_reads(shapes_only):
    cfg = Config.preset("llama3-8b")
    params = tf.param_shapes(cfg)
    cache = tf.cache_shapes(cfg, batch=8, max_len=2048)
    report = mtia_jax.estimate(functools.partial(tf.decode, cfg), params,
                               jax.ShapeDtypeStruct((8,), jnp.int32), cache, chip="mtia450")
    weight_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(params))
    assert report.time_s >= weight_bytes / mtia_jax.chips.get("mtia450").hbm_bandwidth
    assert report.fits


@pytest.mark.parametrize("make, match", [
    (lambda: Config(vocab=8, d_model=30, layers=1, heads=4, kv_heads=4, ffn=8), "multiple of heads"),
    (lambda: Config(vocab=8, d_model=32, layers=1, heads=4, kv_heads=3, ffn=8), "kv_heads"),
    (lambda: Config(vocab=8, d_model=32, layers=0, heads=4, kv_heads=4, ffn=8), "layers"),
    (lambda: Config(vocab=8, d_model=32, layers=1, heads=4, kv_heads=4, ffn=8, experts=2,
                    top_k=3), "top_k"),
    (lambda: Config.preset("llama4"), "unknown preset"),
    (lambda: tf.decode(TINY, tf.param_shapes(TINY), jnp.zeros((2,), jnp.int32),
                       tf.init_cache(TINY, 3, 8)), r"cache\['k'\] has shape"),
    (lambda: tf.prefill(TINY, tf.param_shapes(TINY), jnp.zeros((1, 9), jnp.int32), jnp.array([9]),
                        tf.init_cache(TINY, 1, 8)), "exceeds the cache capacity"),
    (lambda: tf.forward(TINY, tf.param_shapes(TINY), jnp.zeros((4,), jnp.float32)), "tokens"),
])
def test_bad_inputs_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
