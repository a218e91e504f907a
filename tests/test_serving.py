"""models.serving: continuous batching against each request run alone (plain
``jax.jit`` prefill + decode at batch 1), EOS retirement, seeded sampling,
modeled figures against the compiled programs' own costs, the example script."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from models import transformer as tf
from models.serving import (Request, SamplingParams, ServingEngine, kv_cache_bytes, sample,
                            weight_bytes)

CFG = tf.Config.preset("tiny")
MAX_LEN = 24
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return tf.init_params(CFG, jax.random.key(1))


@pytest.fixture(scope="module")
def engine(params):
    # one prefill bucket (prompts <= 8) so the modeled clock is easy to recompute
    return ServingEngine(CFG, params, slots=2, max_len=MAX_LEN, chip="mtia450")


@functools.lru_cache(maxsize=None)
def _ref_programs():
    return jax.jit(functools.partial(tf.prefill, CFG)), jax.jit(functools.partial(tf.decode, CFG))


def _alone(params, prompt, max_new, eos=None):
    """Greedy tokens of one request run by itself: unpadded batch-1 prefill, then decode."""
    pre, dec = _ref_programs()
    tokens = jnp.asarray([prompt], jnp.int32)
    lengths = jnp.array([len(prompt)], jnp.int32)
    logits, cache = pre(params, tokens, lengths, tf.init_cache(CFG, 1, MAX_LEN))
    out = [int(np.argmax(np.asarray(logits)[0, len(prompt) - 1]))]
    while len(out) < max_new and out[-1] != eos:
        logits, cache = dec(params, jnp.asarray([out[-1]], jnp.int32), cache)
        out.append(int(np.argmax(np.asarray(logits)[0])))
    return out


PROMPTS = [([3, 1, 4, 1, 5], 6), ([9], 3), ([2, 6, 5, 3, 5, 8, 9, 7], 5), ([11, 12], 1),
           ([100, 200, 30], 4)]


def test_continuous_batching_equals_each_request_alone(engine, params):
    ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in PROMPTS]
    assert engine.pending == len(PROMPTS) > engine.slots
    results = engine.run()
    assert engine.done and [r.id for r in results[-len(ids):]] == ids
    for (prompt, n), r in zip(PROMPTS, results[-len(ids):]):
        assert r.prompt == prompt
        assert r.tokens == _alone(params, prompt, n)
        assert r.finish_reason == "length" and len(r.tokens) == n


def test_eos_retires_a_request_and_its_slot_is_reused(engine, params):
    prompt = [7, 8, 9]
    free_run = _alone(params, prompt, 6)
    eos = free_run[2]
    want = free_run[:free_run.index(eos) + 1]
    ids = [engine.submit(Request(prompt=prompt, max_new_tokens=6, eos_id=eos)),
           engine.submit(Request(prompt=[5, 4], max_new_tokens=4)),
           engine.submit(Request(prompt=[1, 2, 3, 4], max_new_tokens=5))]  # waits for a slot
    results = {r.id: r for r in engine.run()}
    assert results[ids[0]].tokens == want and results[ids[0]].finish_reason == "eos"
    assert results[ids[1]].tokens == _alone(params, [5, 4], 4)
    assert results[ids[2]].tokens == _alone(params, [1, 2, 3, 4], 5)
    # the third request was admitted after one finished: it waited (TTFT > its own prefill)
    assert results[ids[2]].ttft_s > results[ids[0]].ttft_s


def test_seeded_sampling_is_reproducible_per_request(engine, params):
    sp = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=3)
    a = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=8, sampling=sp))
    engine.submit(Request(prompt=[4, 4, 4, 4], max_new_tokens=3))
    b = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=8, sampling=sp))
    c = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=8,
                              sampling=SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=4)))
    results = {r.id: r for r in engine.run()}
    assert results[a].tokens == results[b].tokens  # different slots and batch companions
    assert results[a].tokens != results[c].tokens


def test_sample_matches_the_restricted_softmax():
    logits = np.array([0.0, 2.0, 1.0, -1.0, 1.5])
    assert sample(logits, SamplingParams()) == 1
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1), np.random.default_rng(0)) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), np.random.default_rng(0)) == 1
    # top_k = 3 keeps tokens 1, 4, 2 with probabilities softmax(logits[[1, 4, 2]] / T)
    sp, rng = SamplingParams(temperature=0.7, top_k=3), np.random.default_rng(0)
    draws = np.array([sample(logits, sp, rng) for _ in range(4000)])
    want = np.zeros(5)
    want[[1, 4, 2]] = np.asarray(jax.nn.softmax(jnp.asarray(logits[[1, 4, 2]]) / 0.7))
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / draws.size, want, atol=0.03)
    # top_p = 0.6: the most likely tokens until their mass reaches 0.6
    probs = np.exp(logits) / np.exp(logits).sum()  # token 1: 0.46, token 4: 0.28 -> keep {1, 4}
    draws = np.array([sample(logits, SamplingParams(1.0, top_p=0.6), rng) for _ in range(2000)])
    assert set(draws) == {1, 4}
    np.testing.assert_allclose((draws == 1).mean(), probs[1] / (probs[1] + probs[4]), atol=0.04)


def test_modeled_figures_are_consistent_with_the_compiled_programs(engine, params):
    for prompt, n in PROMPTS:  # requests of its own: the test must not lean on earlier ones
        engine.submit(Request(prompt=prompt, max_new_tokens=n))
    engine.run()
    stats = engine.stats()
    assert stats.requests > 0 and stats.generated_tokens > 0
    (pre,), (dec,), (ins,) = (list(p.compiled.values()) for p in
                              (engine._prefill, engine._decode, engine._insert))
    t_pre, t_dec, t_ins = (c.cost_analysis()["time_s"] for c in (pre, dec, ins))
    assert min(t_pre, t_dec, t_ins) > 0
    expected = stats.prefill_calls * (t_pre + t_ins) + stats.decode_steps * t_dec
    assert stats.modeled_time_s == pytest.approx(expected, rel=1e-9)
    assert stats.modeled_tokens_per_s == pytest.approx(stats.generated_tokens / stats.modeled_time_s)
    assert stats.host_tokens_per_s > 0 and stats.host_wall_s > stats.host_compile_s > 0
    # a token follows its predecessor by at least one decode step; the first waits a prefill
    assert stats.itl_p50_s >= t_dec * (1 - 1e-9) and stats.itl_p99_s >= stats.itl_p50_s
    assert stats.ttft_p50_s >= t_pre + t_ins and stats.ttft_p99_s >= stats.ttft_p50_s
    # HBM: weights + the (L, slots, S, K, H) k and v caches + lengths, float32
    n_weights = sum(x.size for x in jax.tree.leaves(params))
    kv = 2 * CFG.layers * 2 * MAX_LEN * CFG.kv_heads * CFG.head_dim * 4 + 2 * 4
    assert (stats.weights_bytes, stats.kv_cache_bytes) == (4 * n_weights, kv)
    assert stats.hbm_bytes == 4 * n_weights + kv
    table = stats.table()
    assert "tokens/s" in table and "TTFT" in table and "ITL" in table and "HBM" in table


def test_weight_bytes_under_an_mx4_policy_and_a_mesh(params):
    policy = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")
    layers = params["layers"]
    # mx4: 4 bits per element + one 8-bit scale per 32 inputs for every matmul weight
    mats = [layers[n] for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")] + [params["lm_head"]]
    packed = sum(w.size // 2 + w.size // 32 for w in mats)
    rest = 4 * (params["embed"].size + params["final_norm"].size + layers["attn_norm"].size
                + layers["mlp_norm"].size)
    assert weight_bytes(params, policy) == packed + rest
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    pspecs, cspecs, _ = tf.shardings(CFG, mesh, batch=2)
    cache = tf.init_cache(CFG, 2, 8)
    # k/v split over data (batch) and model (kv heads): 8 ways; lengths over data
    assert kv_cache_bytes(cache, cspecs, mesh) == 2 * cache["k"].nbytes // 8 + 8 // 2


def test_sharded_engine_gives_the_same_greedy_tokens(params):
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    engine = ServingEngine(CFG, params, slots=2, max_len=MAX_LEN, mesh=mesh)
    prompts = PROMPTS[:3]
    for p, n in prompts:
        engine.submit(Request(prompt=p, max_new_tokens=n))
    results = engine.run()
    assert [r.tokens for r in results] == [_alone(params, p, n) for p, n in prompts]
    assert engine.stats().devices == 8 and engine.stats().modeled_tokens_per_s > 0


def test_invalid_requests_and_engines_are_rejected(engine, params):
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        engine.submit(Request(prompt=[1] * 20, max_new_tokens=5))
    with pytest.raises(ValueError, match=r"prompt ids must be in \[0, vocab"):
        engine.submit(Request(prompt=[1, CFG.vocab], max_new_tokens=2))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        engine.submit(Request(prompt=[], max_new_tokens=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(Request(prompt=[1], max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="slots"):
        ServingEngine(CFG, params, slots=0)
    with pytest.raises(ValueError, match="params shapes"):
        ServingEngine(tf.Config.preset("tiny-moe"), params)


def test_example_script_runs_end_to_end():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_llama.py"), "--preset", "tiny", "--chip",
         "mtia450", "--dtype", "mx4", "--requests", "4", "--max-new-tokens", "4", "--slots", "2",
         "--max-len", "16"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("tokens/s"))
    assert "host" in line and "modeled" in line
    assert "requests        4" in proc.stdout and "TTFT" in proc.stdout and "HBM" in proc.stdout
