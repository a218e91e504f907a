"""models.serving: the paged engine against each request run alone (plain
``jax.jit`` prefill + decode at batch 1, contiguous cache) under batched and
chunked prefill, prefix caching and preemption; EOS retirement, seeded
sampling, modeled figures against the compiled programs' own costs, the
example script."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from models import transformer as tf
from runtime import power
from models.serving import (Request, SamplingParams, ServingEngine, kv_cache_bytes, sample,
                            weight_bytes)

CFG = tf.Config.preset("tiny")
MAX_LEN = 24
BLOCK = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return tf.init_params(CFG, jax.random.key(1))


def _engine(params, **kw):
    kw = {"max_num_seqs": 2, "max_len": MAX_LEN, "block_size": BLOCK, "chip": "mtia450", **kw}
    return ServingEngine(CFG, params, **kw)


@pytest.fixture(scope="module")
def engine(params):
    return _engine(params)


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


def _serve(engine, prompts, **request):
    ids = [engine.submit(Request(prompt=p, max_new_tokens=n, **request)) for p, n in prompts]
    results = {r.id: r for r in engine.run()}
    return [results[i] for i in ids]


def _assert_alone(params, prompts, results):
    for (prompt, n), r in zip(prompts, results):
        assert r.prompt == prompt
        assert r.tokens == _alone(params, prompt, n), prompt
        assert r.finish_reason == "length" and len(r.tokens) == n


def test_continuous_batching_equals_each_request_alone(engine, params):
    ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in PROMPTS]
    assert engine.pending == len(PROMPTS) > engine.max_num_seqs
    results = engine.run()
    assert engine.done and [r.id for r in results[-len(ids):]] == ids
    _assert_alone(params, PROMPTS, results[-len(ids):])


def test_several_prompts_prefill_in_one_step(params):
    engine = _engine(params, max_num_seqs=8)
    for p, n in PROMPTS:
        engine.submit(Request(prompt=p, max_new_tokens=n))
    finished = engine.step()
    assert [r.prompt for r in finished] == [[11, 12]]  # its one token came from its prefill
    stats = engine.stats()
    assert stats.steps == 1 and stats.computed_tokens == sum(len(p) for p, _ in PROMPTS)
    assert engine.active == len(PROMPTS) - 1  # every prompt prefilled together; one finished
    _assert_alone(params, PROMPTS, engine.run())


def test_chunked_prefill_mixes_with_decode_and_equals_one_at_a_time(params):
    # a budget of 3 tokens per step: the 8-token prompt takes three steps, while the
    # earlier requests decode beside its chunks
    engine = _engine(params, max_num_seqs=3, max_num_batched_tokens=3)
    schedule, steps = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    results = _serve(engine, PROMPTS)
    _assert_alone(params, PROMPTS, results)
    assert max(sum(n for _, n in step) for step in steps) == 3  # never past the budget
    chunks = [n for step in steps for seq, n in step if seq.request.prompt == PROMPTS[2][0]]
    assert chunks[:3] != [8] and sum(chunks[:3]) <= 8 and len(chunks) > 3  # chunked, then decoded
    assert any(len(step) > 1 and {n for _, n in step} != {1} for step in steps)  # chunk beside decode
    long = results[2]  # the 8-token prompt: its first token waits for its third chunk
    assert long.ttft_s > results[1].ttft_s


def test_without_chunked_prefill_a_prompt_runs_whole(params):
    with pytest.raises(ValueError, match="max_num_batched_tokens = 8 must be >= max_len = 24"):
        _engine(params, chunked_prefill=False, max_num_batched_tokens=8)
    engine = _engine(params, chunked_prefill=False, max_num_batched_tokens=MAX_LEN)
    _assert_alone(params, PROMPTS, _serve(engine, PROMPTS))


def test_prefix_caching_reuses_the_blocks_of_a_shared_prompt_start(params):
    shared = [5, 7, 9, 11, 13, 15, 17, 19, 21]          # two full blocks of 4, and one token
    prompts = [(shared + [1, 2], 3), (shared + [3], 4), (shared[:8], 2), (shared[:4] + [8, 8], 3)]
    engine = _engine(params)
    first = _serve(engine, prompts[:1])
    assert engine.stats().prefix_cached_tokens == 0
    results = _serve(engine, prompts[1:])   # after the first finished: its blocks stay cached
    _assert_alone(params, prompts, first + results)
    # hits: 8 (two blocks), 4 (8 tokens: the last block is recomputed for its logits), 4
    assert engine.stats().prefix_cached_tokens == 8 + 4 + 4
    off = _engine(params, prefix_caching=False)
    _serve(off, prompts)
    assert off.stats().prefix_cached_tokens == 0
    assert off.stats().computed_tokens - engine.stats().computed_tokens == 16


def test_preemption_recomputes_and_keeps_every_token(params):
    # 6 blocks of 4 = 24 positions for up to 4 sequences: growing sequences run out of blocks
    engine = _engine(params, max_num_seqs=4, num_blocks=6)
    prompts = PROMPTS + [([3, 1, 4, 1, 5, 9, 2, 6, 5], 7)]
    _assert_alone(params, prompts, _serve(engine, prompts))
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.peak_blocks == 6
    # sampled tokens do not change either: the sampler's state survives the preemption
    sp = SamplingParams(temperature=1.0, top_k=20, seed=5)
    roomy = _serve(_engine(params, max_num_seqs=4), prompts, sampling=sp)
    tight = _engine(params, max_num_seqs=4, num_blocks=6)
    assert [r.tokens for r in _serve(tight, prompts, sampling=sp)] == [r.tokens for r in roomy]
    assert tight.stats().preemptions > 0


def test_eos_retires_a_request_and_its_blocks_are_reused(engine, params):
    prompt = [7, 8, 9]
    free_run = _alone(params, prompt, 6)
    eos = free_run[2]
    want = free_run[:free_run.index(eos) + 1]
    ids = [engine.submit(Request(prompt=prompt, max_new_tokens=6, eos_id=eos)),
           engine.submit(Request(prompt=[5, 4], max_new_tokens=4)),
           engine.submit(Request(prompt=[1, 2, 3, 4], max_new_tokens=5))]  # waits: 2 sequences max
    results = {r.id: r for r in engine.run()}
    assert results[ids[0]].tokens == want and results[ids[0]].finish_reason == "eos"
    assert results[ids[1]].tokens == _alone(params, [5, 4], 4)
    assert results[ids[2]].tokens == _alone(params, [1, 2, 3, 4], 5)
    # the third request was admitted after one finished: it waited (TTFT > its own prefill)
    assert results[ids[2]].ttft_s > results[ids[0]].ttft_s
    assert engine.blocks.free_blocks == engine.num_blocks  # every block back in the pool


def test_seeded_sampling_is_reproducible_per_request(engine, params):
    sp = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=3)
    a = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=8, sampling=sp))
    engine.submit(Request(prompt=[4, 4, 4, 4], max_new_tokens=3))
    b = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=8, sampling=sp))
    c = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=8,
                              sampling=SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=4)))
    results = {r.id: r for r in engine.run()}
    assert results[a].tokens == results[b].tokens  # different batch companions
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


def test_modeled_figures_are_consistent_with_the_compiled_programs(params):
    engine = _engine(params)
    for prompt, n in PROMPTS:
        engine.submit(Request(prompt=prompt, max_new_tokens=n))
    engine.run()
    stats = engine.stats()
    assert stats.requests == len(PROMPTS) and stats.generated_tokens == sum(n for _, n in PROMPTS)
    calls = engine._step.calls
    assert sum(calls.values()) == stats.steps
    times = {key: engine._step.compiled[key].cost_analysis()["time_s"] for key in calls}
    assert min(times.values()) > 0
    assert stats.modeled_time_s == pytest.approx(sum(calls[k] * times[k] for k in calls), rel=1e-9)
    chip = mtia_jax.chips.get("mtia450")
    joules = {k: power.energy(engine._step.compiled[k].cost, chip).joules for k in calls}
    assert stats.modeled_joules == pytest.approx(sum(calls[k] * joules[k] for k in calls), rel=1e-9)
    # between idle power and the TDP over the modeled time
    assert 0.3 * chip.tdp_watts * stats.modeled_time_s <= stats.modeled_joules <= chip.tdp_watts * stats.modeled_time_s
    assert stats.modeled_tokens_per_s == pytest.approx(stats.generated_tokens / stats.modeled_time_s)
    assert stats.host_tokens_per_s > 0 and stats.host_wall_s > stats.host_compile_s >= 0
    # a token follows its predecessor by at least one step; the first waits its prefill
    assert stats.itl_p50_s >= min(times.values()) * (1 - 1e-9) and stats.itl_p99_s >= stats.itl_p50_s
    assert stats.ttft_p50_s >= min(times.values()) and stats.ttft_p99_s >= stats.ttft_p50_s
    # every prompt token and every generated token but each request's last was computed
    assert stats.computed_tokens == sum(len(p) + n - 1 for p, n in PROMPTS)
    # HBM: weights + the (L, blocks, 4, K, H) k and v pools, float32; 2 x 6 blocks by default
    n_weights = sum(x.size for x in jax.tree.leaves(params))
    assert stats.num_blocks == 2 * MAX_LEN // BLOCK
    kv = 2 * CFG.layers * stats.num_blocks * BLOCK * CFG.kv_heads * CFG.head_dim * 4
    assert (stats.weights_bytes, stats.kv_cache_bytes) == (4 * n_weights, kv)
    assert stats.hbm_bytes == 4 * n_weights + kv
    table = stats.table()
    for word in ("tokens/s", "TTFT", "ITL", "HBM", "KV blocks", "prefix cache", "preemptions", "J/token"):
        assert word in table


def test_weight_bytes_under_an_mx4_policy_and_a_mesh(params):
    policy = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")
    layers = params["layers"]
    # mx4: 4 bits per element + one 8-bit scale per 32 inputs for every matmul weight
    mats = [layers[n] for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")] + [params["lm_head"]]
    packed = sum(w.size // 2 + w.size // 32 for w in mats)
    rest = 4 * (params["embed"].size + params["final_norm"].size + layers["attn_norm"].size
                + layers["mlp_norm"].size)
    assert weight_bytes(params, policy) == packed + rest
    # a rule keeps w_down in float32: its bytes go back from packed mx4 to 4 per element
    w_down = layers["w_down"]
    kept = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8", rules=(("layers/w_down", None),))
    assert weight_bytes(params, kept) == packed + rest - (w_down.size // 2 + w_down.size // 32) + 4 * w_down.size
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    pspecs, cspecs, _ = tf.shardings(CFG, mesh, batch=2)
    cache = tf.init_cache(CFG, 2, 8)
    # k/v split over data (batch) and model (kv heads): 8 ways; lengths over data
    assert kv_cache_bytes(cache, cspecs, mesh) == 2 * cache["k"].nbytes // 8 + 8 // 2
    # the paged pool: its KV heads split over model, its blocks whole on every device
    _, pool_specs = tf.pool_shardings(CFG, mesh)
    pool = tf.init_kv_pool(CFG, 6, 4)
    assert CFG.kv_heads % 4 == 0
    assert kv_cache_bytes(pool, pool_specs, mesh) == 2 * pool["k"].nbytes // 4


def test_sharded_engine_gives_the_same_greedy_tokens(params):
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    engine = _engine(params, mesh=mesh)
    prompts = PROMPTS[:3]
    for p, n in prompts:
        engine.submit(Request(prompt=p, max_new_tokens=n))
    results = engine.run()
    assert [r.tokens for r in results] == [_alone(params, p, n) for p, n in prompts]
    assert engine.stats().devices == 8 and engine.stats().modeled_tokens_per_s > 0


def test_invalid_requests_and_engines_are_rejected(engine, params):
    with pytest.raises(ValueError, match="exceeds the engine's max_len = 24"):
        engine.submit(Request(prompt=[1] * 20, max_new_tokens=5))
    with pytest.raises(ValueError, match=r"prompt ids must be in \[0, vocab"):
        engine.submit(Request(prompt=[1, CFG.vocab], max_new_tokens=2))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        engine.submit(Request(prompt=[], max_new_tokens=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(Request(prompt=[1], max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_num_seqs must be an int >= 1"):
        ServingEngine(CFG, params, max_num_seqs=0)
    with pytest.raises(ValueError, match="cannot hold one sequence of max_len = 24"):
        ServingEngine(CFG, params, max_len=MAX_LEN, block_size=4, num_blocks=5)
    with pytest.raises(ValueError, match="params shapes"):
        ServingEngine(tf.Config.preset("tiny-moe"), params)


def test_example_script_runs_end_to_end():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_llama.py"), "--preset", "tiny", "--chip",
         "mtia450", "--dtype", "mx4", "--requests", "4", "--max-new-tokens", "4", "--max-num-seqs", "2",
         "--max-len", "16"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("tokens/s"))
    assert "host" in line and "modeled" in line
    assert re.search(r"^requests +4 ", proc.stdout, re.M) and "TTFT" in proc.stdout and "HBM" in proc.stdout
