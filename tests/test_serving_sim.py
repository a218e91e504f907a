"""The shapes-only serving simulator (models/serving_sim.py): token times by
hand on a three-request trace with fixed step costs, preemption when KV
blocks run out, chunked prefill, and step times from real estimates."""

import dataclasses

import pytest

from models import load, transformer as tf
from models.serving_sim import ServingSimulator, StepTimes

TINY = tf.Config.preset("tiny")


@dataclasses.dataclass
class FixedTimes:
    """Decode steps cost ``d``, prefill ``p`` per token: costs a hand can add up."""

    d: float = 0.01
    p: float = 0.001
    estimates: int = 0

    def decode(self, batch, context):
        return self.d

    def prefill(self, tokens):
        return self.p * tokens


def _sim(**kw):
    sim = ServingSimulator(TINY, chip="mtia450", kv_blocks=kw.pop("kv_blocks", 64), block_size=4, **kw)
    sim.times = FixedTimes()
    return sim


def test_three_requests_by_hand():
    reqs = [load.LoadRequest(0.0, 10, 3), load.LoadRequest(0.0, 6, 2), load.LoadRequest(1.0, 4, 1)]
    result = _sim(max_num_batched_tokens=64).run(reqs)
    # step 1 at t=0: both prompts (16 tokens) prefill together: 0.016; each samples its first token
    # step 2: both decode: +0.01 -> 0.026; request 1 is done (2 tokens)
    # step 3: request 0 decodes: 0.036, done (3 tokens); the clock idles to request 2's arrival
    # step 4 at t=1.0: its 4-token prompt: 1.004, done (1 token)
    m = result.metrics
    assert m.requests == 3 and m.output_tokens == 6 and result.steps == 4
    assert m.ttft.p50 == pytest.approx(0.016) and m.ttft.mean == pytest.approx((0.016 * 2 + 0.004) / 3)
    assert m.e2e.mean == pytest.approx((0.036 + 0.026 + 0.004) / 3)
    assert m.makespan_s == pytest.approx(1.004)
    assert m.tpot.mean == pytest.approx(((0.036 - 0.016) / 2 + 0.01) / 2)


def test_chunked_prefill_spreads_a_long_prompt_over_steps_beside_decodes():
    reqs = [load.LoadRequest(0.0, 4, 4), load.LoadRequest(0.0, 40, 1)]
    chunked = _sim(max_num_batched_tokens=16).run(reqs)
    # step 1: the short prompt (4) and 12 tokens of the long one; then 1 decode + 15, 1 + 13:
    # the long prompt's first token comes at the end of step 3
    assert chunked.metrics.requests == 2 and chunked.steps == 4
    assert chunked.metrics.ttft.mean == pytest.approx((0.016 + (0.016 + 0.025 + 0.023)) / 2)
    # without chunking a prompt longer than the step's token budget can never run: a clear error
    with pytest.raises(RuntimeError, match="40 prompt tokens cannot be scheduled"):
        _sim(max_num_batched_tokens=16, chunked_prefill=False).run(reqs)


def test_running_out_of_kv_blocks_preempts_and_every_request_still_finishes():
    reqs = [load.LoadRequest(0.01 * i, 8, 24) for i in range(6)]
    result = _sim(kv_blocks=24, max_num_batched_tokens=64).run(reqs)
    assert result.preemptions > 0
    assert result.metrics.requests == 6 and result.metrics.output_tokens == 6 * 24


def test_step_times_come_from_estimates_and_are_cached():
    times = StepTimes(TINY, chip="mtia450")
    a, b = times.decode(3, 100), times.decode(4, 200)  # both bucket to (4, 256)
    assert a == b and times.estimates == 1
    assert times.decode(64, 256) > a and times.prefill(64) > times.prefill(16) > 0
