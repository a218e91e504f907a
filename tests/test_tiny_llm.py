"""The trained byte-level Llama of ``models.tiny_llm``: the committed
checkpoint reloads to the perplexity recorded beside it, well below the
unigram baseline, and training is deterministic given its seed."""

import functools
import math

import jax
import numpy as np
import pytest

from models import tiny_llm
from models import transformer as tf

# a config small enough to train a few steps in a second or two
MINI = tf.Config(vocab=256, d_model=32, layers=1, heads=2, kv_heads=1, ffn=64,
                 rope_theta=10000.0, rope_scaling=None, max_seq_len=32, dtype="float32")


@pytest.fixture(scope="module")
def checkpoint():
    cfg, params = tiny_llm.load()
    return cfg, params, tiny_llm.read_meta(), tiny_llm.eval_slice()


def test_committed_checkpoint_reloads_to_its_recorded_perplexity(checkpoint):
    cfg, params, meta, data = checkpoint
    assert cfg == tiny_llm.CONFIG
    assert len(data) == meta["eval_slice_bytes"] == tiny_llm.EVAL_SLICE_BYTES
    ppl = tiny_llm.heldout_perplexity(cfg, params, data, seq_len=meta["seq_len"])
    assert ppl == pytest.approx(meta["eval_slice_ppl"], rel=1e-4)
    # well below the unigram baseline of the same bytes, and on the whole held-out split
    assert ppl < 0.5 * meta["eval_slice_unigram_ppl"]
    assert meta["heldout_ppl"] < 0.5 * meta["unigram_ppl"]
    assert meta["heldout_files"] > 0 and meta["train_files"] > 5 * meta["heldout_files"]


def test_checkpoint_is_small_and_stored_in_bfloat16():
    from models import checkpoint as ck

    file = tiny_llm.CHECKPOINT_DIR / ck.SINGLE_FILE
    assert file.stat().st_size < 4 << 20
    infos, _ = ck.read_safetensors_header(file)
    assert {str(info.dtype) for info in infos.values()} == {"bfloat16"}


def test_perplexity_does_not_depend_on_the_batching():
    params = tf.init_params(MINI, jax.random.key(0))
    data = tiny_llm.eval_slice()[:300]  # 299 targets: 9 full windows of 32 and one of 11
    a = tiny_llm.heldout_perplexity(MINI, params, data, seq_len=32, batch=16)
    b = tiny_llm.heldout_perplexity(MINI, params, data, seq_len=32, batch=3)
    assert a == pytest.approx(b, rel=1e-6)
    # direct: the mean negative log-likelihood of every byte after the first
    x, y, n = tiny_llm._windows(data, 32)
    logits = np.asarray(jax.jit(functools.partial(tf.forward, MINI))(params, x, n)[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, y[..., None], -1)[..., 0]
    valid = np.arange(32)[None] < n[:, None]
    assert valid.sum() == len(data) - 1
    assert a == pytest.approx(math.exp(-picked[valid].mean()), rel=1e-5)


def test_training_is_deterministic_given_the_seed():
    data = tiny_llm.eval_slice()[:8192]
    run = lambda seed: tiny_llm.train(MINI, data, steps=3, seed=seed, batch=4, seq_len=32)
    (p1, h1), (p2, h2), (p3, _) = run(0), run(0), run(1)
    assert h1 == h2 and len(h1) == 1 and h1[0]["step"] == 3
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, p1, p2)))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, p1, p3)))


def test_the_split_is_by_file_name():
    # pinned: the held-out set is a fixed function of the file names
    assert [n for n in ("doctest.py", "os.py", "pprint.py", "typing.py") if tiny_llm.is_heldout(n)] \
        == ["doctest.py", "pprint.py"]
    files = tiny_llm.corpus_files()
    assert files == sorted(files) and "this.py" not in files
    assert all("/" not in n and n.endswith(".py") for n in files)


def test_a_precision_policy_runs_under_the_compiler(checkpoint):
    import jax.numpy as jnp

    import mtia_jax

    cfg, params, meta, data = checkpoint
    data = data[:4096]
    bf16 = cfg.replace(dtype="bfloat16"), jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    base = tiny_llm.heldout_perplexity(*bf16, data, batch=16)
    mx8 = tiny_llm.heldout_perplexity(*bf16, data, batch=16,
                                      precision=mtia_jax.PrecisionPolicy(weights="mx8", activations="mx8"))
    assert mx8 != base and mx8 == pytest.approx(base, rel=0.02)  # rounded, and close
