"""Synthetic click logs with a known answer, and a DLRM trained on them.

    data = make_data(seed=0, n=200_000, split="heldout")  # regenerated from the seed
    teacher_metrics(data)                                 # (AUC, NE): the ceiling / floor
    cfg, params = load()                                  # the committed student
    heldout_auc(params, cfg, data)                        # (AUC, NE) as in meta.json
    heldout_auc(params, cfg.replace(dtype="bfloat16"), data,
                precision=mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"))

**The teacher.** Labels are drawn from a fixed DLRM-DCNv2 over the same
tables as the student, narrower (``TEACHER_CONFIG``: embedding width 8,
bottom MLP 16-8, one rank-4 cross layer, top MLP 32-1), its parameters drawn
once with NumPy from ``TEACHER_SEED`` (``teacher_params``: He-scaled MLP and
cross weights, embedding rows of deviation ``TEACHER_EMBED_STD``), its last
layer rescaled so that its logits over a fixed calibration sample have mean
``TEACHER_BIAS`` and deviation ``TEACHER_SCALE``: about one click in ten and
a Bayes AUC near 0.79. The student's family holds the teacher exactly (zero
embedding columns, a zero second cross layer, and an extra ReLU layer that
passes the teacher's non-negative hidden units through unchanged), so what
the student misses is estimation error: finite data, and the ids of the
Zipf tail seen a few dozen times each. A label is
``Bernoulli(sigmoid(teacher logit))``, so the teacher's own probabilities
are the best any model can score on these data: its held-out AUC is the
achievable ceiling and its normalized entropy the floor (up to the held-out
sample's noise). The teacher is evaluated in float64 NumPy
(``numpy_forward``, an independent implementation of
``models.dlrm.forward``), so the labels do not depend on XLA's float sums.

**The features** (``make_data``), as in Criteo's click logs: 13 dense
integer counts, log-normal (``DENSE_LOG_MEAN``, ``DENSE_LOG_STD``), mapped
to ``log(count + 3)`` as TorchRec's Criteo preprocessing does; per table,
a bag of 1..multi_hot[t] ids (uniform), each id's rank drawn from a
discrete Zipf law P(rank k) ~ k^-s over the table's rows (``ZIPF_EXPONENTS``,
1.05..1.2, an assumption: the heavy tail of CTR logs), ranks scattered over the rows by a
fixed permutation per table. A few ids carry most of the traffic and the
tail is seen rarely (in the 3M training samples of ``examples/train_dlrm.py``
the median id of the largest table is seen about 100 times, the rarest about
30), and the student learns the tail's embeddings worse than the head's: on
the committed checkpoint, its AUC falls 0.021 short of the teacher's on the
held-out samples whose table-0 ids all rank among the 100 most frequent, and
0.029 on those with an id ranked beyond 1,000 (logit correlation with the
teacher 0.95 and 0.91).

A split is regenerated exactly from ``(seed, split, n)`` (NumPy's PCG64 stream
``default_rng([seed, split index])``): the train and held-out sets are
independent streams, and the held-out set does not depend on the train
set's size. No data file is stored.

**Metrics.** ``auc`` (rank-based ROC AUC, ties counting one half: that of
``models.dlrm``) and ``normalized_entropy`` (He et al. 2014, "Practical
lessons from predicting clicks on ads at Facebook": the mean log loss over
the log loss of always predicting the base rate; 1 is no better than the
base rate, lower is better).

**The checkpoint** (``save`` / ``load``): ``model.safetensors`` (float32,
keys the ``/``-joined paths of the parameter dict, e.g.
``tables/table_0``, ``top_mlp/w2``) and ``meta.json`` (config, seed, steps,
data sizes, the student's and teacher's held-out AUC and NE) under
``CHECKPOINT_DIR``; ``examples/train_dlrm.py`` writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import dlrm, training
from models.dlrm import auc

__all__ = ["CONFIG", "CHECKPOINT_DIR", "TEACHER_SEED", "CTRData", "make_data", "teacher_params",
           "numpy_forward", "auc", "normalized_entropy", "teacher_metrics", "logits", "heldout_auc",
           "make_optimizer", "train", "save", "load", "read_meta", "config_to_json", "TEACHER_CONFIG",
           "config_from_json"]

# The student: the tiny DLRM-DCNv2 of models.dlrm (embedding width 16, bottom MLP 32-16,
# two rank-8 cross layers, top MLP 64-32-1) with bigger tables, so that the Zipf tail
# holds ids the training set shows a few dozen times only (assumption: sizes of
# 4 to 10,000 rows, 15,554 in all, 266k parameters, 1.1 MB in float32)
CONFIG = dlrm.Config(table_sizes=(10000, 4000, 1000, 400, 100, 40, 10, 4),
                     multi_hot=(3, 2, 1, 4, 1, 2, 1, 3), embed_dim=16, bottom_mlp=(32, 16),
                     top_mlp=(64, 32, 1), interaction="dcnv2", cross_layers=2, cross_rank=8,
                     row_wise_min_rows=500, stack_size=4, row_align=8)

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "dlrm"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"

SPLITS = {"train": 0, "heldout": 1, "calibration": 2}

# assumption: the Zipf exponent of each table's ids (1.05..1.2: a heavy tail, a few ids
# carrying most lookups, as in click logs)
ZIPF_EXPONENTS = (1.05, 1.1, 1.2, 1.15, 1.1, 1.05, 1.2, 1.15)
# assumption: log-normal counts, exp(N(mu_j, sigma_j)), floored, for the 13 dense features
DENSE_LOG_MEAN = tuple(np.round(np.linspace(0.0, 4.0, 13), 4).tolist())
DENSE_LOG_STD = tuple(np.round(np.linspace(1.5, 0.75, 13), 4).tolist())

# the teacher: its seed (any fixed number), its shape, the deviation of its embedding rows
# and the mean and deviation of its logits over the calibration sample (assumption:
# about one click in ten, between Criteo 1TB's 3 % and Criteo Kaggle's 26 %, and a
# Bayes AUC near 0.79, the range of production CTR models)
TEACHER_SEED = 1906_00091  # DLRM's arXiv number
TEACHER_CONFIG = CONFIG.replace(embed_dim=8, bottom_mlp=(16, 8), top_mlp=(32, 1), cross_layers=1, cross_rank=4)
TEACHER_EMBED_STD = 0.5
TEACHER_BIAS, TEACHER_SCALE = -2.75, 1.5
CALIBRATION_SAMPLES = 20000


# ------------------------------------------------------------ data

class CTRData(NamedTuple):
    """A split of the synthetic click logs (NumPy): ``dense`` (N, 13)
    float32, ``sparse`` a tuple of (N, multi_hot[t]) int32 ids, -1 padded,
    ``labels`` (N,) int32 clicks, ``teacher_logits`` (N,) float64 (the
    log-odds the labels were drawn with)."""

    dense: np.ndarray
    sparse: tuple
    labels: np.ndarray
    teacher_logits: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> "CTRData":
        """The samples at ``index`` (a slice or an index array)."""
        return CTRData(self.dense[index], tuple(s[index] for s in self.sparse), self.labels[index],
                       self.teacher_logits[index])


@functools.lru_cache(maxsize=None)
def _zipf_tables(cfg: dlrm.Config) -> tuple:
    """Per table: (CDF of the Zipf ranks, permutation rank -> id)."""
    rng = np.random.default_rng([TEACHER_SEED, 99])
    out = []
    for rows, s in zip(cfg.table_sizes, _exponents(cfg)):
        weights = np.arange(1, rows + 1, dtype=np.float64) ** -s
        cdf = np.cumsum(weights)
        out.append((cdf / cdf[-1], rng.permutation(rows).astype(np.int32)))
    return tuple(out)


def _exponents(cfg: dlrm.Config) -> tuple:
    return tuple(ZIPF_EXPONENTS[t % len(ZIPF_EXPONENTS)] for t in range(cfg.num_tables))


def _features(cfg: dlrm.Config, n: int, rng: np.random.Generator):
    """(dense, sparse) of ``n`` samples (see the module docstring)."""
    mean = np.resize(np.asarray(DENSE_LOG_MEAN), cfg.dense_features)
    std = np.resize(np.asarray(DENSE_LOG_STD), cfg.dense_features)
    counts = np.floor(np.exp(rng.normal(mean, std, (n, cfg.dense_features))))
    dense = np.log(counts + 3.0).astype(np.float32)
    sparse = []
    for hot, (cdf, ids_of_rank) in zip(cfg.multi_hot, _zipf_tables(cfg)):
        lengths = rng.integers(1, hot + 1, (n, 1))
        rank = np.searchsorted(cdf, rng.random((n, hot)), side="right")
        ids = ids_of_rank[np.minimum(rank, len(cdf) - 1)]
        sparse.append(np.where(np.arange(hot)[None, :] < lengths, ids, -1).astype(np.int32))
    return dense, tuple(sparse)


def make_data(seed: int, n: int, split: str = "train") -> CTRData:
    """``n`` samples of the ``split`` ("train" or "heldout") stream of
    ``seed``: features, then labels drawn from the teacher. Deterministic
    (NumPy only). Every feature is drawn for all ``n`` samples at once, so a
    split is reproduced by its seed *and* its size (``make_data(seed, m)``
    is not a prefix of ``make_data(seed, n)``)."""
    if split not in SPLITS:
        raise ValueError(f"make_data: split must be one of {sorted(SPLITS)}, got {split!r}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"make_data: n must be a positive int, got {n!r}")
    rng = np.random.default_rng([int(seed), SPLITS[split]])
    dense, sparse = _features(TEACHER_CONFIG, int(n), rng)
    logits = numpy_forward(TEACHER_CONFIG, teacher_params(), dense, sparse)
    labels = (rng.random(int(n)) < _sigmoid(logits)).astype(np.int32)
    return CTRData(dense, sparse, labels, logits)


# ------------------------------------------------------------ the teacher

def _table(cfg: dlrm.Config, tables: dict, t: int):
    """Table ``t``'s (rows, D) array (padding rows included) in a parameter dict."""
    for g in dlrm.table_plan(cfg):
        if t in g.tables:
            return tables[g.name] if g.placement == "row_wise" else tables[g.name][g.tables.index(t)]
    raise AssertionError(t)


def numpy_forward(cfg: dlrm.Config, params: dict, dense, sparse, *, chunk: int = 8192) -> np.ndarray:
    """``models.dlrm.forward`` in float64 NumPy (logits (B,)), for the
    teacher: the bottom MLP, sum-pooled bags (-1 ids skipped), the DCNv2
    cross layers or the dot interaction, the top MLP; ``chunk`` samples at
    a time (small arrays stay in cache)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n = len(dense)
    if n > chunk:
        return np.concatenate([numpy_forward(cfg, p, dense[i:i + chunk], [s[i:i + chunk] for s in sparse],
                                             chunk=chunk) for i in range(0, n, chunk)])

    def mlp(w, x, relu_last):
        n = len(w) // 2
        for i in range(n):
            x = x @ w[f"w{i}"] + w[f"b{i}"]
            if i < n - 1 or relu_last:
                x = np.maximum(x, 0.0)
        return x

    x = mlp(p["bottom_mlp"], np.asarray(dense, np.float64), True)
    pooled = []
    for t, ids in enumerate(sparse):
        ids = np.asarray(ids)
        rows = _table(cfg, p["tables"], t)
        pooled.append((rows[np.maximum(ids, 0)] * (ids >= 0)[..., None]).sum(1))
    if cfg.interaction == "dot":
        z = np.stack([x, *pooled], axis=1)
        dots = np.einsum("bid,bjd->bij", z, z)
        i, j = np.triu_indices(z.shape[1], 1)
        z = np.concatenate([x, dots[:, i, j]], axis=1)
    else:
        x0 = np.concatenate([x, *pooled], axis=1)
        z = x0
        for l in range(cfg.cross_layers):
            c = p["cross"]
            z = x0 * ((z @ c[f"v{l}"]) @ c[f"u{l}"] + c[f"b{l}"]) + z
    return mlp(p["top_mlp"], z, False)[:, 0]


@functools.lru_cache(maxsize=None)
def _teacher_params(cfg: dlrm.Config) -> dict:
    rng = np.random.default_rng(TEACHER_SEED)
    shapes = dlrm._param_shapes_dict(cfg)
    params = {}
    for part, group in shapes.items():
        params[part] = {}
        for name, shape in group.items():
            if part == "tables":
                value = rng.normal(0.0, TEACHER_EMBED_STD, shape)
                g = next(g for g in dlrm.table_plan(cfg) if g.name == name)
                rows = np.array([cfg.table_sizes[t] for t in g.tables]).reshape(-1, 1, 1)
                mask = np.arange(g.rows)[None, :, None] < rows  # padding rows zero
                value = value * (mask[0] if g.placement == "row_wise" else mask)
            elif name.startswith("b"):
                value = rng.uniform(-0.1, 0.1, shape)
            else:  # He: variance 2 / fan_in through the ReLUs
                value = rng.normal(0.0, math.sqrt(2.0 / shape[0]), shape)
            params[part][name] = value
    # calibrate: the last layer scaled and shifted so that the logits of a fixed sample
    # have mean TEACHER_BIAS and deviation TEACHER_SCALE
    calib = _features(cfg, CALIBRATION_SAMPLES, np.random.default_rng([TEACHER_SEED, SPLITS["calibration"]]))
    raw = numpy_forward(cfg, params, *calib)
    last = len(cfg.top_mlp) - 1
    a = TEACHER_SCALE / raw.std()
    params["top_mlp"][f"w{last}"] = params["top_mlp"][f"w{last}"] * a
    params["top_mlp"][f"b{last}"] = (params["top_mlp"][f"b{last}"] - raw.mean()) * a + TEACHER_BIAS
    for group in params.values():
        for value in group.values():
            value.flags.writeable = False
    return params


def teacher_params() -> dict:
    """The teacher's parameters (float64 NumPy, read-only), in the layout of
    ``models.dlrm`` for ``TEACHER_CONFIG`` (``dlrm.forward`` runs them too)."""
    return _teacher_params(TEACHER_CONFIG)


# ------------------------------------------------------------ metrics

def _sigmoid(z):
    z = np.asarray(z, np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def normalized_entropy(labels, probs, base_rate: float | None = None) -> float:
    """Normalized entropy (He et al. 2014): the mean log loss of ``probs``
    over the entropy of the base rate, ``-(p log p + (1-p) log(1-p))`` with
    ``p = base_rate`` (default: the mean label). Probabilities are clipped to
    [1e-15, 1 - 1e-15]."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, np.float64).reshape(-1)
    if labels.shape != probs.shape:
        raise ValueError(f"normalized_entropy: labels {labels.shape} and probs {probs.shape} must "
                         f"have the same number of entries")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("normalized_entropy: labels must be 0 or 1")
    p = float(labels.mean()) if base_rate is None else float(base_rate)
    if not 0.0 < p < 1.0:
        raise ValueError(f"normalized_entropy: the base rate must be in (0, 1), got {p}")
    q = np.clip(probs, 1e-15, 1.0 - 1e-15)
    logloss = -np.mean(np.where(labels == 1, np.log(q), np.log1p(-q)))
    return float(logloss / -(p * math.log(p) + (1.0 - p) * math.log1p(-p)))


def teacher_metrics(data: CTRData) -> tuple[float, float]:
    """(AUC, NE) of the teacher's own probabilities on ``data``: the ceiling
    of any model's AUC and the floor of its NE, up to sampling noise."""
    return auc(data.labels, data.teacher_logits), normalized_entropy(data.labels, _sigmoid(data.teacher_logits))


def _cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                        else jnp.asarray(x), tree)


@functools.lru_cache(maxsize=16)
def _scorer(cfg: dlrm.Config, precision, chip):
    forward = functools.partial(dlrm.forward, cfg)
    if precision is None and chip is None:
        return jax.jit(forward)
    import mtia_jax  # the compiler, only for runs under a policy or on a chip
    return mtia_jax.jit(forward, chip=chip, precision=precision)


def logits(params: dict, cfg: dlrm.Config, data: CTRData, *, precision=None, chip: str | None = None,
           batch: int = 8192) -> np.ndarray:
    """The model's logits (N,) float64 on ``data``, ``batch`` samples per
    forward pass (a short last batch padded, so one program serves all);
    under ``mtia_jax.jit(..., chip=chip, precision=precision)`` when either
    is given, else ``jax.jit``. Parameters and dense features are cast to
    ``cfg.dtype``."""
    try:
        score = _scorer(cfg, precision, chip)
    except TypeError:  # an unhashable policy: not cached
        score = _scorer.__wrapped__(cfg, precision, chip)
    params = _cast(params, cfg.param_dtype)
    n = len(data)
    batch = min(batch, n)
    out = []
    for start in range(0, n, batch):
        part = data.take(slice(start, start + batch))
        rows = len(part)
        if rows < batch:  # pad with copies of the first sample, scored and dropped
            part = part.take(np.r_[np.arange(rows), np.zeros(batch - rows, np.int64)])
        z = score(params, jnp.asarray(part.dense, cfg.param_dtype), tuple(jnp.asarray(s) for s in part.sparse))
        out.append(np.asarray(z, np.float64)[:rows])
    return np.concatenate(out)


def heldout_auc(params: dict, cfg: dlrm.Config, data: CTRData, precision=None, *, chip: str | None = None,
                batch: int = 8192) -> tuple[float, float]:
    """(AUC, NE) of the model ``(params, cfg)`` on ``data`` (the held-out
    split). ``precision``: a ``mtia_jax.PrecisionPolicy``; the forward then
    runs under ``mtia_jax.jit(..., chip=chip, precision=precision)``, its
    matmuls in the policy's MX formats (bit-exact OCP MX rounding), as
    ``examples/compare_dtypes.py`` runs the DLRM. Parameters and activations
    are in ``cfg.dtype``: ``cfg.replace(dtype="bfloat16")`` for a bf16 run
    (the parameters are cast here). NE against the held-out base rate."""
    z = logits(params, cfg, data, precision=precision, chip=chip, batch=batch)
    return auc(data.labels, z), normalized_entropy(data.labels, _sigmoid(z))


# ------------------------------------------------------------ training

def make_optimizer(steps: int, lr: float = 3e-3):
    """Adam with a cosine decay from ``lr`` to ``lr / 10`` over ``steps``."""
    import optax  # training only

    return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1))


def _loss(cfg: dlrm.Config, params, dense, sparse, labels):
    import optax

    z = dlrm.forward(cfg, params, dense, sparse)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, labels.astype(jnp.float32)))


@functools.lru_cache(maxsize=8)
def _train_step(cfg: dlrm.Config, steps: int, lr: float):
    """(optimizer, jitted step): one program per (config, schedule), reused
    by every run with them."""
    optimizer = make_optimizer(steps, lr)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, dense, sparse, labels):
        import optax

        loss, grads = jax.value_and_grad(functools.partial(_loss, cfg))(params, dense, sparse, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def train(cfg: dlrm.Config, data: CTRData, *, steps: int, seed: int = 0, batch: int = 1024,
          lr: float = 3e-3, eval_data: CTRData | None = None, eval_every: int = 0,
          progress: bool = False):
    """Train ``cfg`` from ``dlrm.init_params(cfg, key(seed))`` on ``data``
    for ``steps`` Adam steps (``make_optimizer``) of ``batch`` samples,
    taken in the order of one ``numpy.random.default_rng(seed)``
    permutation per epoch, minimising the mean sigmoid cross-entropy.
    Deterministic given ``seed``.

    With ``eval_data``, the AUC and NE on it are measured every
    ``eval_every`` steps and at the end; ``progress`` shows a tqdm bar.
    Returns ``(params, history)``: float32 parameters and a list of
    ``{"step", "loss", "auc", "ne"}`` (loss: the mean since the last entry)."""
    if steps < 1:
        raise ValueError(f"train: steps must be >= 1, got {steps}")
    if not 1 <= batch <= len(data):
        raise ValueError(f"train: batch must be in 1..{len(data)} (the training samples), got {batch}")
    optimizer, step = _train_step(cfg, steps, lr)
    params = dlrm.init_params(cfg, jax.random.key(seed))
    opt_state = optimizer.init(params)

    rng = np.random.default_rng(seed)
    per_epoch = len(data) // batch
    order = None

    def batch_of(i):
        nonlocal order
        k = (i - 1) % per_epoch
        if k == 0:
            order = rng.permutation(len(data))
        part = data.take(order[k * batch:(k + 1) * batch])
        return (jnp.asarray(part.dense), tuple(jnp.asarray(s) for s in part.sparse), jnp.asarray(part.labels))

    evaluate = None
    if eval_data is not None:
        evaluate = lambda p: dict(zip(("auc", "ne"), heldout_auc(p, cfg, eval_data)))
    postfix = lambda loss, last: {"loss": f"{loss:.4f}",
                                  "heldout_auc": "-" if last is None else f"{last['auc']:.4f}",
                                  "heldout_ne": "-" if last is None else f"{last['ne']:.4f}"}
    return training.run(step, params, opt_state, batch_of, steps=steps, evaluate=evaluate,
                        metrics=("auc", "ne"), eval_every=eval_every, progress=progress,
                        postfix_every=50, postfix=postfix)


# ------------------------------------------------------------ checkpoint

def config_to_json(cfg: dlrm.Config) -> dict:
    """The config's fields, tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_json(fields: dict) -> dlrm.Config:
    return dlrm.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _flatten(params: dict) -> dict:
    return {f"{part}/{name}": np.asarray(value, np.float32)
            for part, group in params.items() for name, value in group.items()}


def save(params: dict, meta: dict, path: str | Path = CHECKPOINT_DIR) -> list[Path]:
    """Write ``model.safetensors`` (float32, ``/``-joined keys) and
    ``meta.json`` (``meta``, which should hold ``"config"``:
    ``config_to_json(cfg)``) in ``path``."""
    from models import checkpoint  # generic safetensors writer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint.write_safetensors(path / WEIGHTS_FILE, _flatten(params))
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return [path / WEIGHTS_FILE, path / META_FILE]


def read_meta(path: str | Path = CHECKPOINT_DIR) -> dict:
    """The figures recorded beside the checkpoint (``meta.json``)."""
    return json.loads((Path(path) / META_FILE).read_text())


def load(path: str | Path = CHECKPOINT_DIR) -> tuple[dlrm.Config, dict]:
    """The checkpoint's ``(cfg, params)``: float32 NumPy parameters in the
    layout of ``models.dlrm``, checked against the config's shapes."""
    from models import checkpoint

    path = Path(path)
    cfg = config_from_json(read_meta(path)["config"])
    flat = checkpoint.read_safetensors(path / WEIGHTS_FILE)
    shapes = dlrm._param_shapes_dict(cfg)
    expected = {f"{part}/{name}": tuple(shape) for part, group in shapes.items() for name, shape in group.items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != expected:
        raise checkpoint.CheckpointError(f"{path / WEIGHTS_FILE}: tensors {got} do not match the config's "
                                         f"{expected}")
    params: dict = {part: {} for part in shapes}
    for key, value in flat.items():
        part, name = key.split("/")
        params[part][name] = value
    return cfg, params
