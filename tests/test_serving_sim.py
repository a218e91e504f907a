"""The shapes-only serving simulator (models/serving_sim.py): token times by
hand on a three-request trace with fixed step costs, preemption when KV
blocks run out, chunked prefill, and step times from real estimates."""

import dataclasses

import pytest

import mtia_jax

from models import load, transformer as tf
from models.serving_sim import ServingSimulator, StepTimes

TINY = tf.Config.preset("tiny")


@dataclasses.dataclass
class FixedTimes:
    """A step costs ``fixed`` (its weights) plus ``per_token`` per scheduled
    token: costs a hand can add up."""

    fixed: float = 0.01
    per_token: float = 0.001
    watts: float = 100.0       # while a step runs
    idle_watts: float = 10.0   # while none does
    estimates: int = 0

    def step(self, tokens, seqs, width):
        return self.fixed + self.per_token * tokens

    def joules(self, tokens, seqs, width):
        return self.watts * self.step(tokens, seqs, width)


def _sim(**kw):
    sim = ServingSimulator(TINY, chip="mtia450", kv_blocks=kw.pop("kv_blocks", 64), block_size=4, **kw)
    sim.times = FixedTimes()
    return sim


def test_three_requests_by_hand():
    reqs = [load.LoadRequest(0.0, 10, 3), load.LoadRequest(0.0, 6, 2), load.LoadRequest(1.0, 4, 1)]
    result = _sim(max_num_batched_tokens=64).run(reqs)
    # step 1 at t=0: both prompts (16 tokens) prefill together: 0.026; each samples its first token
    # step 2: both decode (2 tokens): +0.012 -> 0.038; request 1 is done (2 tokens)
    # step 3: request 0 decodes: +0.011 -> 0.049, done (3 tokens); the clock idles to request 2
    # step 4 at t=1.0: its 4-token prompt: 1.014, done (1 token)
    m = result.metrics
    assert m.requests == 3 and m.output_tokens == 6 and result.steps == 4
    assert m.ttft.p50 == pytest.approx(0.026) and m.ttft.mean == pytest.approx((0.026 * 2 + 0.014) / 3)
    assert m.e2e.mean == pytest.approx((0.049 + 0.038 + 0.014) / 3)
    assert m.makespan_s == pytest.approx(1.014)
    assert m.tpot.mean == pytest.approx(((0.049 - 0.026) / 2 + (0.038 - 0.026)) / 2)
    # energy: 100 W over the four steps (0.063 s), 10 W over the idle gap 0.049 -> 1.0
    assert result.joules == pytest.approx(100 * 0.063 + 10 * (1.0 - 0.049))
    assert result.joules_per_token == pytest.approx(result.joules / 6)


def test_chunked_prefill_spreads_a_long_prompt_over_steps_beside_decodes():
    reqs = [load.LoadRequest(0.0, 4, 4), load.LoadRequest(0.0, 40, 1)]
    chunked = _sim(max_num_batched_tokens=16).run(reqs)
    # step 1: the short prompt (4) and 12 tokens of the long one: 0.026; then 1 decode + 15
    # (0.052), 1 + 13 (0.076): the long prompt's first token; then one decode (0.087)
    assert chunked.metrics.requests == 2 and chunked.steps == 4
    assert chunked.metrics.ttft.mean == pytest.approx((0.026 + 0.076) / 2)
    assert chunked.metrics.makespan_s == pytest.approx(0.087)
    # without chunking a prompt longer than the step's token budget can never run: a clear error
    with pytest.raises(RuntimeError, match="40 prompt tokens cannot be scheduled"):
        _sim(max_num_batched_tokens=16, chunked_prefill=False).run(reqs)


def test_a_shared_prompt_prefix_is_computed_once_while_cached():
    # two 10-token prompts whose first 8 tokens are the same system prompt, a second apart:
    # the first computes 10 tokens (0.020 s); the second finds blocks 0-1 (8 tokens) cached
    # and computes 2 (0.012 s)
    reqs = load.with_shared_prefix([load.LoadRequest(0.0, 2, 1), load.LoadRequest(1.0, 2, 1)], 8)
    assert [(r.prompt_len, r.prefix_id, r.prefix_len) for r in reqs] == [(10, 0, 8)] * 2
    cached = _sim(max_num_batched_tokens=64).run(reqs)
    assert cached.prefix_cached_tokens == 8
    assert cached.metrics.ttft.mean == pytest.approx((0.020 + 0.012) / 2)
    plain = _sim(max_num_batched_tokens=64, prefix_caching=False).run(reqs)
    assert plain.prefix_cached_tokens == 0 and plain.metrics.ttft.mean == pytest.approx(0.020)
    # different prefixes share nothing
    other = [reqs[0], dataclasses.replace(reqs[1], prefix_id=1)]
    assert _sim(max_num_batched_tokens=64).run(other).prefix_cached_tokens == 0


def test_running_out_of_kv_blocks_preempts_and_every_request_still_finishes():
    reqs = [load.LoadRequest(0.01 * i, 8, 24) for i in range(6)]
    result = _sim(kv_blocks=24, max_num_batched_tokens=64).run(reqs)
    assert result.preemptions > 0
    assert result.metrics.requests == 6 and result.metrics.output_tokens == 6 * 24


def test_step_times_come_from_paged_step_estimates_and_are_cached():
    times = StepTimes(TINY, chip="mtia450", kv_blocks=64, block_size=4)
    a, b = times.step(3, 2, 5), times.step(9, 2, 7)  # both bucket to (16 tokens, 2, 8 blocks)
    assert a == b and times.estimates == 1
    assert times.step(256, 2, 8) > a and times.step(16, 2, 64) > a > 0
    # the energy of a step lies between its time at idle power and at the TDP
    tdp = mtia_jax.chips.get("mtia450").tdp_watts
    assert times.idle_watts * a < times.joules(3, 2, 5) <= tdp * a
