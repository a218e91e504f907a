"""A small byte-level Llama trained on the Python standard library's source.

    cfg, params = load()                                  # the committed checkpoint
    data = eval_slice()                                   # the committed held-out bytes
    heldout_perplexity(cfg, params, data)                 # as recorded in meta.json
    heldout_perplexity(cfg.replace(dtype="bfloat16"), cast(params, jnp.bfloat16), data,
                       precision=mtia_jax.PrecisionPolicy(weights="mx4"))

The model is ``models.transformer`` at ``CONFIG`` (vocabulary 256: one token
per byte). The corpus is one every machine has without a download: the
top-level ``*.py`` modules of the standard library
(``sysconfig.get_paths()["stdlib"]``, no packages, so no tests, idlelib or
site-packages), in sorted order, split into train and held-out *by file* by
a hash of the file name (``is_heldout``). ``examples/train_tiny_llm.py``
trains it (``train``) and writes the checkpoint under ``CHECKPOINT_DIR``:
``model.safetensors`` + ``config.json`` (``models.checkpoint.save_hf``, the
weights stored in bfloat16), ``meta.json`` (the figures of the run) and
``eval_slice.bin.gz``, the first ``EVAL_SLICE_BYTES`` of the held-out
stream. The slice is committed so that the checkpoint's perplexity on it is
exact on any machine, whatever its Python patch release's stdlib holds.

Perplexity is per byte: ``exp`` of the mean negative log-likelihood of every
byte after the first, the stream cut into windows of ``seq_len`` tokens that
each predict the next ``seq_len`` bytes (the context restarts at each window).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import training
from models import transformer as tf

__all__ = ["CONFIG", "CHECKPOINT_DIR", "EVAL_SLICE_BYTES", "corpus_files", "is_heldout",
           "load_corpus", "unigram_perplexity", "heldout_perplexity", "make_optimizer", "train",
           "save", "load", "eval_slice", "read_meta"]

# a few hundred thousand parameters per layer: d_model 128, 4 layers, 4 query heads
# of dimension 32 sharing 2 key/value heads, SwiGLU width 352 (2.75 x, a multiple of
# the MX block of 32), untied output head; RoPE base 10000 unscaled (short context)
CONFIG = tf.Config(vocab=256, d_model=128, layers=4, heads=4, kv_heads=2, ffn=352,
                   rope_theta=10000.0, rope_scaling=None, max_seq_len=256, dtype="float32")

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "tiny_llm"
META_FILE = "meta.json"
EVAL_SLICE_FILE = "eval_slice.bin.gz"
EVAL_SLICE_BYTES = 32 * 1024
HELDOUT_PERCENT = 10
# top-level modules left out: this.py is ROT13 text, not Python
EXCLUDED = frozenset({"this.py"})


# ------------------------------------------------------------ corpus

def corpus_files(stdlib: str | Path | None = None) -> list[str]:
    """The corpus: file names of the standard library's top-level ``*.py``
    modules (packages are left out), sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    return sorted(p.name for p in root.glob("*.py") if p.is_file() and p.name not in EXCLUDED)


def is_heldout(name: str) -> bool:
    """Whether file ``name`` is held out: the first 8 bytes of its SHA-256
    as an integer, modulo 100, below ``HELDOUT_PERCENT``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100 < HELDOUT_PERCENT


def load_corpus(stdlib: str | Path | None = None, *, max_train_bytes: int | None = None,
                max_heldout_bytes: int | None = None) -> dict:
    """The train and held-out byte streams (uint8 arrays): each split's files
    concatenated in sorted order, cut at ``max_*_bytes`` (None: no cap); with
    the names of the files (those of which a byte was kept) and their sizes."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out = {}
    for split, held, cap in (("train", False, max_train_bytes), ("heldout", True, max_heldout_bytes)):
        names, chunks, size = [], [], 0
        for name in corpus_files(root):
            if is_heldout(name) != held or (cap is not None and size >= cap):
                continue
            data = (root / name).read_bytes()
            if cap is not None:
                data = data[:cap - size]
            names.append(name)
            chunks.append(data)
            size += len(data)
        out[split] = np.frombuffer(b"".join(chunks), np.uint8)
        out[f"{split}_files"] = names
    return out


def unigram_perplexity(train: np.ndarray, data: np.ndarray) -> float:
    """Per-byte perplexity on ``data[1:]`` (the bytes ``heldout_perplexity``
    scores) of the byte frequencies of ``train``, add-one smoothed."""
    counts = np.bincount(np.asarray(train, np.uint8), minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[np.asarray(data, np.uint8)[1:]].mean()))


# ------------------------------------------------------------ evaluation

def _windows(data: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs (W, seq_len) int32, targets (W, seq_len) int32 and lengths (W,)
    of ``data`` cut into windows: window i reads bytes i*seq_len .. and
    predicts the byte after each; the last one is right-padded."""
    data = np.asarray(data, np.uint8)
    n = len(data) - 1  # the bytes predicted
    if n < 1:
        raise ValueError(f"heldout_perplexity: need at least 2 bytes, got {len(data)}")
    count = -(-n // seq_len)
    padded = np.zeros(count * seq_len + 1, np.int32)
    padded[:len(data)] = data
    inputs = padded[:-1].reshape(count, seq_len)
    targets = padded[1:].reshape(count, seq_len)
    lengths = np.minimum(seq_len, n - np.arange(count) * seq_len).astype(np.int32)
    return inputs, targets, lengths


def _target_logprobs(logits, targets):
    """log p(target) (B, T) float32 of logits (B, T, V)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=16)
def _scorer(cfg: tf.Config, precision, chip):
    """A function (params, inputs, targets, lengths) -> log p(target) (B, T):
    the forward under ``jax.jit``, or under ``mtia_jax.jit(precision=...)``
    when a precision policy is given."""
    forward = lambda params, tokens, lengths: tf.forward(cfg, params, tokens, lengths)[0]
    if precision is None and chip is None:
        return jax.jit(lambda p, x, y, n: _target_logprobs(forward(p, x, n), y))
    import mtia_jax  # the compiler, only for runs under a policy or on a chip
    run = mtia_jax.jit(forward, chip=chip, precision=precision)
    score = jax.jit(_target_logprobs)
    return lambda p, x, y, n: score(run(p, x, n), y)


def heldout_perplexity(cfg: tf.Config, params: dict, data, *, seq_len: int = 256, batch: int = 32,
                       precision=None, chip: str | None = None) -> float:
    """Per-byte perplexity of the model on ``data`` (bytes or a uint8 array):
    ``exp`` of the mean negative log-likelihood of ``data[1:]``, the bytes
    read in windows of ``seq_len`` (each window's context starts afresh),
    ``batch`` windows per forward pass (a short last batch is padded, so one
    program serves every batch).

    ``precision``: a ``mtia_jax.PrecisionPolicy``; the forward then runs under
    ``mtia_jax.jit(..., chip=chip, precision=precision)``, its matmuls in the
    policy's MX formats (bit-exact OCP MX rounding), as
    ``examples/compare_dtypes.py`` runs a model. Parameters and activations
    are in ``cfg.dtype``: pass ``cfg.replace(dtype="bfloat16")`` with the
    parameters cast for a bf16 run. The log-softmax is float32, the sum float64."""
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(bytes(data), np.uint8)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"heldout_perplexity: seq_len {seq_len} exceeds cfg.max_seq_len {cfg.max_seq_len}")
    inputs, targets, lengths = _windows(data, seq_len)
    try:
        score = _scorer(cfg, precision, chip)
    except TypeError:  # an unhashable policy: not cached
        score = _scorer.__wrapped__(cfg, precision, chip)
    total, count = 0.0, 0
    for start in range(0, len(inputs), batch):
        x, y, n = inputs[start:start + batch], targets[start:start + batch], lengths[start:start + batch]
        rows = len(x)
        if rows < batch:  # pad with copies of a real window, scored and then dropped
            fill = batch - rows
            x, y, n = (np.concatenate([a, np.repeat(a[:1], fill, axis=0)]) for a in (x, y, n))
        logp = np.asarray(score(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(n)), np.float64)
        valid = np.arange(seq_len)[None, :] < n[:, None]
        valid[rows:] = False
        total += float(logp[valid].sum())
        count += int(valid.sum())
    return math.exp(-total / count)


# ------------------------------------------------------------ training

def make_optimizer(steps: int, lr: float = 3e-3, warmup: int | None = None,
                   weight_decay: float = 0.1):
    """AdamW (b2 0.95) with global-norm clipping at 1, a linear warmup
    (default 5% of ``steps``) to ``lr`` then cosine decay to ``lr / 10``;
    weight decay on the matrices only (not the norms)."""
    import optax  # training only

    warmup = max(1, steps // 20) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda w: w.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                                   mask=decay_mask))


def _loss(cfg: tf.Config, params, batch):
    logits = tf.forward(cfg, params, batch[:, :-1])[0]
    return -_target_logprobs(logits, batch[:, 1:]).mean()


@functools.lru_cache(maxsize=8)
def _step_fn(cfg: tf.Config, steps: int, lr: float, warmup: int | None, weight_decay: float):
    """The optimizer and the jitted training step (params, opt_state, batch)
    -> (params, opt_state, loss), built once per setting."""
    import optax

    optimizer = make_optimizer(steps, lr, warmup, weight_decay)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(functools.partial(_loss, cfg))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def train(cfg: tf.Config, data, *, steps: int, seed: int = 0, batch: int = 16, seq_len: int = 256,
          lr: float = 3e-3, warmup: int | None = None, weight_decay: float = 0.1,
          eval_data=None, eval_every: int = 0, progress: bool = False):
    """Train ``cfg`` from ``tf.init_params(cfg, key(seed))`` on the byte
    stream ``data`` for ``steps`` AdamW steps (``make_optimizer``) of
    ``batch`` windows of ``seq_len + 1`` bytes at offsets drawn uniformly by
    ``numpy.random.default_rng(seed)``, minimising the mean next-byte
    cross-entropy. Deterministic given ``seed``.

    With ``eval_data``, the held-out perplexity (``heldout_perplexity``) is
    measured every ``eval_every`` steps and at the end; ``progress`` shows a
    tqdm bar with the train loss and the last held-out perplexity.

    Returns ``(params, history)``: the float32 parameters and a list of
    ``{"step", "loss", "heldout_ppl"}`` (loss: the mean of the steps since
    the last entry; heldout_ppl: the perplexity on ``eval_data``, None when
    not measured)."""
    data = np.asarray(data, np.uint8)
    if len(data) < seq_len + 2:
        raise ValueError(f"train: need more than seq_len + 1 = {seq_len + 1} bytes, got {len(data)}")
    if steps < 1:
        raise ValueError(f"train: steps must be >= 1, got {steps}")
    optimizer, step = _step_fn(cfg, steps, lr, warmup, weight_decay)
    params = tf.init_params(cfg, jax.random.key(seed))
    opt_state = optimizer.init(params)

    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)

    def batch_of(_):
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
        return (jnp.asarray(data[starts[:, None] + offsets[None, :]].astype(np.int32)),)

    evaluate = None
    if eval_data is not None:
        evaluate = lambda p: {"heldout_ppl": heldout_perplexity(cfg, p, eval_data, seq_len=seq_len)}
    postfix = lambda loss, last: {"loss": f"{loss:.3f}", "train_ppl": f"{math.exp(loss):.2f}",
                                  "heldout_ppl": "-" if last is None else f"{last['heldout_ppl']:.3f}"}
    return training.run(step, params, opt_state, batch_of, steps=steps, evaluate=evaluate,
                        metrics=("heldout_ppl",), eval_every=eval_every, progress=progress,
                        postfix_every=10, postfix=postfix)


# ------------------------------------------------------------ checkpoint

def save(params: dict, meta: dict, eval_bytes, path: str | Path = CHECKPOINT_DIR,
         cfg: tf.Config = CONFIG) -> list[Path]:
    """Write the checkpoint in ``path``: the weights in bfloat16 through
    ``models.checkpoint.save_hf`` (``model.safetensors``, ``config.json``),
    ``meta.json`` and the gzipped evaluation slice ``eval_bytes``."""
    from models import checkpoint  # checkpoint imports transformer only

    path = Path(path)
    stored = cfg.replace(dtype="bfloat16")
    written = checkpoint.save_hf(jax.tree.map(lambda w: np.asarray(w).astype(stored.param_dtype), params),
                                 path, stored)
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (path / EVAL_SLICE_FILE).write_bytes(gzip.compress(bytes(np.asarray(eval_bytes, np.uint8)), 9, mtime=0))
    return written + [path / META_FILE, path / EVAL_SLICE_FILE]


def load(path: str | Path = CHECKPOINT_DIR, dtype: str = "float32") -> tuple[tf.Config, dict]:
    """The checkpoint's ``(cfg, params)``, both in ``dtype`` (the stored
    bfloat16 weights are exact in float32)."""
    from models import checkpoint

    path = Path(path)
    cfg = checkpoint.config_from_hf(json.loads((path / checkpoint.CONFIG_FILE).read_text()))
    cfg = cfg.replace(dtype=dtype)
    return cfg, checkpoint.load_hf_params(path, cfg)


def eval_slice(path: str | Path = CHECKPOINT_DIR) -> np.ndarray:
    """The committed evaluation slice: the first ``EVAL_SLICE_BYTES`` of the
    held-out stream, a uint8 array."""
    return np.frombuffer(gzip.decompress((Path(path) / EVAL_SLICE_FILE).read_bytes()), np.uint8)


def read_meta(path: str | Path = CHECKPOINT_DIR) -> dict:
    """The figures recorded beside the checkpoint (``meta.json``)."""
    return json.loads((Path(path) / META_FILE).read_text())
