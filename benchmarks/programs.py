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
