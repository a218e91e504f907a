"""models.scheduler: the token budget, first come first served admission,
running sequences before the queue, chunking, preemption of the newest
sequence with recompute, and prefix-cache hits, step by step by hand."""

import pytest

from models.scheduler import Scheduler, Sequence


def _steps(sched: Scheduler, steps: int):
    """Run ``steps`` steps, each sequence that is ready appending one token;
    returns [(id, tokens) per scheduled sequence] per step."""
    out = []
    for _ in range(steps):
        step = sched.schedule()
        out.append([(seq.id, n) for seq, n in step])
        for seq in sched.update(step):
            seq.append(0)
    return out


def test_budget_fcfs_chunking_and_running_first():
    sched = Scheduler(64, 4, max_num_seqs=8, max_num_batched_tokens=8)
    for i, n in enumerate([5, 6, 2]):
        sched.add(Sequence(i, n))
    # step 1: seq 0 whole (5), 3 tokens of seq 1; step 2: the decoding seq 0 first, then the rest
    # of seq 1 (3), then seq 2 (2) and so on; never more than 8 tokens
    assert _steps(sched, 3) == [[(0, 5), (1, 3)], [(0, 1), (1, 3), (2, 2)], [(0, 1), (1, 1), (2, 1)]]


def test_without_chunking_a_prompt_waits_whole_and_blocks_the_queue():
    sched = Scheduler(64, 4, max_num_seqs=8, max_num_batched_tokens=8, chunked_prefill=False)
    for i, n in enumerate([5, 6, 1]):
        sched.add(Sequence(i, n))
    # seq 1 does not fit beside seq 0; seq 2 waits behind it (first come first served)
    assert _steps(sched, 2) == [[(0, 5)], [(0, 1), (1, 6), (2, 1)]]


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(64, 4, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        sched.add(Sequence(i, 2))
    assert _steps(sched, 1) == [[(0, 2), (1, 2)]]
    sched.finish(sched.running[0])
    assert _steps(sched, 1) == [[(1, 1), (2, 2)]]


def test_the_newest_sequence_is_preempted_and_recomputed():
    # 4 blocks of 2 positions: two sequences of 3 tokens hold 2 blocks each; the first to grow
    # past 4 positions needs a fifth block: the newest (seq 1) is preempted
    sched = Scheduler(4, 2, max_num_seqs=4, max_num_batched_tokens=16)
    sched.add(Sequence(0, 3))
    sched.add(Sequence(1, 3))
    assert _steps(sched, 2) == [[(0, 3), (1, 3)], [(0, 1), (1, 1)]]
    # both now hold 4 positions of 5 known tokens (2 blocks each, the pool is full)
    step = sched.schedule()
    assert [(s.id, n) for s, n in step] == [(0, 1)] and sched.preemptions == 1
    assert [s.id for s in sched.waiting] == [1] and sched.waiting[0].computed == 0
    sched.update(step)
    sched.finish(sched.running[0])
    # readmitted: its prompt and both generated tokens (5) are recomputed at once
    assert [(s.id, n) for s, n in sched.schedule()] == [(1, 5)]


def test_prefix_cache_hits_whole_blocks_but_never_the_last_token():
    sched = Scheduler(16, 4, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = list(range(10))
    first = Sequence(0, 10, prompt)
    sched.add(first)
    sched.update(sched.schedule())
    sched.finish(first)
    # the same 10 tokens: blocks 0 and 1 (8 tokens) hit; 2 are computed
    again = Sequence(1, 10, prompt)
    sched.add(again)
    step = sched.schedule()
    assert [(s.id, n) for s, n in step] == [(1, 2)] and again.computed == 8
    for seq in sched.update(step):
        seq.append(0)
    # exactly 8 tokens: only block 0 may hit (block 1 holds the last token)
    short = Sequence(2, 8, prompt[:8])
    sched.add(short)
    assert [(s.id, n) for s, n in sched.schedule()] == [(1, 1), (2, 4)]
    assert sched.prefix_cached_tokens == 8 + 4
    # sequences without token ids never hit
    sched.add(Sequence(3, 10))
    assert sched.schedule()[-1][1] == 10


def test_a_sequence_needs_a_token():
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        Sequence(0, 0)
