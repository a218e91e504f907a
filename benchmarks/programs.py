"""Programs shared by the benchmarks: written in plain jnp, as researchers do."""

import jax
import jax.numpy as jnp
import numpy as np


def mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.gelu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def layer_norm(x, gamma):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * gamma


def attention(q, k, v):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def transformer_block(x, p, heads=8):
    b, t, d = x.shape
    h = layer_norm(x, p["ln1"])
    q, k, v = (jnp.reshape(h @ p[name], (b, t, heads, d // heads)) for name in ("wq", "wk", "wv"))
    x = x + attention(q, k, v).reshape(b, t, d) @ p["wo"]
    h = layer_norm(x, p["ln2"])
    return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def transformer(x, layers):
    for p in layers:
        x = transformer_block(x, p)
    return x


def rnn_scan(params, xs, h0):
    w_x, w_h = params

    def cell(h, x):
        h = jnp.tanh(x @ w_x + h @ w_h)
        return h, h

    return jax.lax.scan(cell, h0, xs)


def block_params(key, d, dtype=jnp.float32):
    names = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "w1": (d, 4 * d), "w2": (4 * d, d)}
    keys = jax.random.split(key, len(names))
    p = {n: (jax.random.normal(k, s) / np.sqrt(s[0])).astype(dtype) for k, (n, s) in zip(keys, names.items())}
    p["ln1"] = jnp.ones((d,), dtype)
    p["ln2"] = jnp.ones((d,), dtype)
    return p


def make_mlp(key, dims=(256, 512, 512, 256), batch=64):
    keys = jax.random.split(key, len(dims))
    params = [(jax.random.normal(k, (i, o)) / np.sqrt(i), jnp.zeros((o,)))
              for k, i, o in zip(keys[1:], dims[:-1], dims[1:])]
    return params, jax.random.normal(keys[0], (batch, dims[0]))


def make_transformer(key, layers=1, d=128, batch=2, seq=64, dtype=jnp.float32):
    keys = jax.random.split(key, layers + 1)
    return (jax.random.normal(keys[0], (batch, seq, d)).astype(dtype),
            [block_params(k, d, dtype) for k in keys[1:]])


def make_rnn(key, d=128, steps=32, batch=8):
    k1, k2, k3 = jax.random.split(key, 3)
    return ((jax.random.normal(k1, (d, d)) / np.sqrt(d), jax.random.normal(k2, (d, d)) / np.sqrt(d)),
            jax.random.normal(k3, (steps, batch, d)), jnp.zeros((batch, d)))


# ---------------------------------------------------------------- Llama decode

LLAMA_CONFIGS = {
    # published Llama 3 shapes (Meta, "The Llama 3 Herd of Models", 2024, Table 3)
    "llama3-8b": dict(layers=32, d_model=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
    "llama3-70b": dict(layers=80, d_model=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256),
    "llama3-405b": dict(layers=126, d_model=16384, ffn=53248, heads=128, kv_heads=8, vocab=128256),
    "tiny": dict(layers=2, d_model=64, ffn=128, heads=4, kv_heads=2, vocab=256),
}


def rms_norm(x, w, eps=1e-5):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype) * w


def llama_step(params, cache_k, cache_v, tokens, position, *, heads, kv_heads,
               grouped_attention=True):
    """T new tokens per sequence through a Llama-style model, layers under ``lax.scan``.

    tokens (B, T) int32 are written to the caches (L, B, S, KV, Dh) at
    positions ``position`` .. ``position`` + T - 1, each attending to the cache
    positions up to its own (a prompt of T tokens from position 0 is causal
    prefill; T = 1 is a decode step). Keys and values are stored in the
    caches' dtype and attention runs in it, so an FP8 cache is read as FP8.
    The caches are carried through the scan over layers and written in place
    (donate them: ``donate_argnums=(1, 2)``), as serving engines do.
    ``grouped_attention=False`` runs one attention per query head of a group
    (each reading its K/V head's cache), as an attention kernel that is not
    GQA-aware does; the numbers are the same.
    Returns the logits of the last new token (B, vocab) and the updated caches."""
    x = params["embed"][tokens]                                # (B, T, D)
    b, t, d = x.shape
    dh = d // heads
    group = heads // kv_heads
    kv_dtype = cache_k.dtype

    def layer(carry, weights):
        x, cache_k, cache_v = carry
        w, index = weights
        h = rms_norm(x, w["ln1"])
        q = (h @ w["wq"]).reshape(b, t, kv_heads, group, dh).astype(kv_dtype)
        k = (h @ w["wk"]).reshape(b, t, kv_heads, dh).astype(kv_dtype)
        v = (h @ w["wv"]).reshape(b, t, kv_heads, dh).astype(kv_dtype)
        at = (index, 0, position, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None], at)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None], at)
        ck = jax.lax.dynamic_index_in_dim(cache_k, index, 0, keepdims=False)
        cv = jax.lax.dynamic_index_in_dim(cache_v, index, 0, keepdims=False)
        live = jnp.arange(ck.shape[1])[None, :] <= position + jnp.arange(t)[:, None]  # (T, S)
        if grouped_attention:
            attn = _attend(q, ck, cv, live, "bqkgd,bskd->bkgqs", "bkgqs,bskd->bqkgd")
        else:
            attn = jnp.stack([_attend(q[:, :, :, g], ck, cv, live, "bqkd,bskd->bkqs",
                                      "bkqs,bskd->bqkd") for g in range(group)], axis=3)
        attn = attn.astype(x.dtype).reshape(b, t, d)
        x = x + attn @ w["wo"]
        h = rms_norm(x, w["ln2"])
        x = x + (jax.nn.silu(h @ w["w1"]) * (h @ w["w3"])) @ w["w2"]
        return (x, cache_k, cache_v), None

    layers = jnp.arange(cache_k.shape[0], dtype=jnp.int32)
    (x, cache_k, cache_v), _ = jax.lax.scan(layer, (x, cache_k, cache_v), (params["layers"], layers))
    logits = rms_norm(x[:, -1:], params["ln_f"])[:, 0, :] @ params["unembed"]
    return logits, cache_k, cache_v


def _attend(q, ck, cv, live, scores_spec: str, values_spec: str):
    """Softmax attention of ``q`` over the cache, masked to ``live`` (T, S)."""
    dh = q.shape[-1]
    scores = jnp.einsum(scores_spec, q, ck) / np.sqrt(dh).astype(ck.dtype)
    scores = jnp.where(live, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(ck.dtype)
    return jnp.einsum(values_spec, probs, cv)


def llama_decode_step(params, cache_k, cache_v, tokens, position, *, heads, kv_heads,
                      grouped_attention=True):
    """One decode step of a Llama-style model (``llama_step`` with T = 1).

    tokens (B,) int32; caches (L, B, S, KV, Dh); position: int32 scalar.
    Returns logits (B, vocab) and the updated caches."""
    return llama_step(params, cache_k, cache_v, tokens[:, None], position,
                      heads=heads, kv_heads=kv_heads, grouped_attention=grouped_attention)


def llama_shapes(config: dict, batch: int, cache_len: int, dtype=jnp.bfloat16, kv_dtype=None):
    """ShapeDtypeStructs of (params, cache_k, cache_v, tokens, position); the
    caches in ``kv_dtype`` (default: ``dtype``)."""
    c = config
    d, f, L = c["d_model"], c["ffn"], c["layers"]
    dh = d // c["heads"]
    kv = c["kv_heads"] * dh
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    layers = {"ln1": s(L, d), "ln2": s(L, d), "wq": s(L, d, d), "wk": s(L, d, kv), "wv": s(L, d, kv),
              "wo": s(L, d, d), "w1": s(L, d, f), "w3": s(L, d, f), "w2": s(L, f, d)}
    params = {"embed": s(c["vocab"], d), "layers": layers, "ln_f": s(d), "unembed": s(d, c["vocab"])}
    cache = jax.ShapeDtypeStruct((L, batch, cache_len, c["kv_heads"], dh), kv_dtype or dtype)
    return (params, cache, cache, jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))


def _kv_groups(config: dict | None, model: int) -> bool:
    """Whether ``model`` tensor-parallel devices outnumber the KV heads in whole groups."""
    from models.transformer import kv_head_groups
    return config is not None and kv_head_groups(config["kv_heads"], model) > 1


def llama_mesh(config: dict | None, data: int, model: int, chip=None):
    """The mesh ``llama_shardings(config, model)`` expects
    (``models.transformer.tensor_parallel_mesh``): ("data", "model"), or, when
    ``model`` devices outnumber the KV heads, ("data", "model", "rep") with
    "model" the KV heads and "rep" the devices sharing each."""
    from models.transformer import tensor_parallel_mesh
    return tensor_parallel_mesh(config["kv_heads"] if config is not None else model, data, model, chip)


def llama_shardings(config: dict | None = None, model: int = 1):
    """Megatron tensor parallel over ``model`` devices, batch over "data"
    (PartitionSpecs, on ``llama_mesh``).

    K/V projections and the KV cache split by KV head. With more devices
    than KV heads, query heads, FFN and vocabulary split over ("model",
    "rep") and each KV head lives on the "rep" devices whose query heads
    read it (as vLLM replicates KV heads); when ``model`` neither divides nor
    is a multiple of the KV heads, they are replicated over "model"."""
    from jax.sharding import PartitionSpec as P
    tp = ("model", "rep") if _kv_groups(config, model) else "model"
    kv_split = config is None or config["kv_heads"] % model == 0 or _kv_groups(config, model)
    kv = P(None, None, "model") if kv_split else P()
    layers = {"ln1": P(), "ln2": P(), "wq": P(None, None, tp), "wk": kv, "wv": kv,
              "wo": P(None, tp, None), "w1": P(None, None, tp),
              "w3": P(None, None, tp), "w2": P(None, tp, None)}
    params = {"embed": P(), "layers": layers, "ln_f": P(), "unembed": P(None, tp)}
    cache = P(None, "data", None, "model" if kv_split else None, None)
    return (params, cache, cache, P("data"), P())
