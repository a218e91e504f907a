"""DLRM and DLRM-DCNv2 click-through-rate models in ``flax.nnx``.

    cfg = Config.preset("tiny")                       # DCNv2; "tiny-dot": dot interaction
    model = DLRM(cfg, rngs=nnx.Rngs(0))
    dense, sparse, labels = synthetic_batch(cfg, batch=64, key=0)
    logits = model(dense, sparse)                     # (64,) float32
    print(auc(labels, logits))

The architecture (Naumov et al. 2019, "Deep Learning Recommendation Model for
Personalization and Recommendation Systems", arXiv:1906.00091; TorchRec
``torchrec.models.dlrm``): the dense features go through the *bottom MLP*
(ReLU after every layer) to one vector of the embedding width D; every
sparse feature is pooled (summed) from its own embedding table with
``embedding_bag``; then the *interaction*:

- ``"dot"`` (DLRM): the F + 1 vectors (the bottom MLP's first, then the
  tables in order) are dotted pairwise and the strict upper triangle, row by
  row (TorchRec's ``triu_indices(F + 1, F + 1, offset=1)`` order), is
  concatenated after the bottom MLP's output: D + (F + 1) F / 2 features;
- ``"dcnv2"`` (DLRM-DCNv2, the MLPerf recommendation benchmark; Wang et al.
  2021, "DCN V2", arXiv:2008.13535):
  the F + 1 vectors are concatenated, x0 of width N = (F + 1) D, and go
  through ``cross_layers`` low-rank cross layers
  ``x_{l+1} = x0 * (U_l (V_l x_l) + b_l) + x_l`` (V_l: N -> r, U_l: r -> N;
  TorchRec ``LowRankCrossNet``, its ``V_kernels`` / ``W_kernels``);

and the *top MLP* (ReLU after every layer but the last) gives the logit.

The ``mlperf-dcnv2`` preset is the MLPerf DLRM-DCNv2 model, every number from
the reference implementations: mlcommons/training
``recommendation_v2/torchrec_dlrm/README.MD`` (the 26 table sizes of the
Criteo 1TB click logs after capping every table at 40,000,000 rows, the
multi-hot sizes, ``--embedding_dim 128``, ``--dense_arch_layer_sizes
512,256,128``, ``--over_arch_layer_sizes 1024,1024,512,256,1``,
``--interaction_type=dcn --dcn_num_layers=3 --dcn_low_rank_dim=512``);
mlcommons/inference ``recommendation/dlrm_v2/pytorch`` (the same shapes in
``backend_pytorch_native.py``, ``--max-ind-range=40000000`` in the README,
the fp32 checkpoint of 97.31 GB). Its parameter count, derived from those
shapes: 204,184,588 table rows x 128 = 26,135,627,264 embedding parameters
plus 16,044,545 dense ones (bottom MLP 171,392, cross layers 10,627,200, top
MLP 5,245,953) = 26,151,671,809 (104.6 GB in fp32, 97.4 GiB).

Functional core. The parameters are a plain dict:

    bottom_mlp: w0 (13, h0), b0 (h0,), w1 ..., the last layer's width is D
    tables:     table_<i> (rows_i, D)          a table split row-wise (rows padded)
                stack_<k> (T, rows, D)         T tables split table-wise, stacked
    cross:      v0 (N, r), u0 (r, N), b0 (N,), v1 ...     ("dcnv2" only, one per layer)
    top_mlp:    w0 (in, h0), b0 (h0,), ...,  the last layer's width is 1

Weights are stored (in, out), so a layer is ``x @ w + b``. Which tables are
stacked is fixed by the config (``table_plan``): tables of at least
``row_wise_min_rows`` rows are stored alone, for a row-wise split; the
others are sorted by (ids per sample, rows) and stacked ``stack_size`` at a
time, for a table-wise split (a last, partial stack is stored as single
tables instead). A stack holds each of its tables padded to its largest
one's rows; single tables are padded to a multiple of ``row_align`` rows so
that a mesh axis dividing ``row_align`` splits them evenly. Padding rows are
never read (``padding``).

Inputs. ``dense`` is float (B, dense_features) (Criteo: 13 integer counts,
which TorchRec's Criteo preprocessing, used by the MLPerf reference, maps
to log(x + 3)). ``sparse`` is
a tuple of F integer arrays, one per table in order: ``sparse[t]`` has shape
(B, multi_hot[t]) and holds the ids of each sample's bag, padded with -1 —
the padded form of ``embedding_bag``. Why that form and not the jagged
(``lengths=``/``offsets=``) one: MLPerf's multi-hot Criteo gives every
sample exactly ``multi_hot[t]`` ids of table t (mlcommons/inference
``tools/multi_hot.py``), so the rectangle has no padding at all; its static
shape serves every batch with one compiled program (a jagged values array
changes length from batch to batch); and the batch is its leading dimension,
so splitting the batch over devices is a split of rows, where a flat jagged
array cannot be split by sample without rebasing its offsets. Ids outside a
table contribute nothing (``embedding_bag``'s rule).

Sharding (``shardings``; the partition rules are
``lowering.passes.partition_embedding``): the MLPs and the interaction are
data parallel (batch split over the "batch" mesh axis, weights replicated);
single tables are split row-wise over the "tables" axis (their ids
replicated on it; each device pools the rows it holds and the partial sums
are reduced onto the batch split); stacks are split table-wise over the
"tables" axis (each device pools whole tables; one all_to_all moves the
pooled (T, B, D) onto the batch split). On a 1-D mesh both roles use its
one axis (DLRM's hybrid parallelism: model-parallel tables, data-parallel
MLPs on the same devices). ``forward(..., mesh=mesh)`` adds the sharding
constraints that name those batch splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import mtia_jax
from models import presets
from mtia_jax.primitives.embedding_bag import embedding_bag

__all__ = ["Config", "PRESETS", "TableGroup", "DLRM", "table_plan", "init_params", "param_shapes",
           "params_of", "param_count", "padding", "forward", "synthetic_batch", "auc",
           "shardings", "SHARDING_RULES", "input_shapes", "estimate"]

INTERACTIONS = ("dot", "dcnv2")


# ------------------------------------------------------------ configuration

@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a DLRM. Hashable: bind it with ``functools.partial``.

    ``table_sizes[t]`` rows and ``multi_hot[t]`` ids per sample for table t;
    ``bottom_mlp`` and ``top_mlp`` are the layers' output widths (the bottom
    MLP ends at ``embed_dim``, the top MLP at 1); ``cross_layers`` and
    ``cross_rank`` shape the DCNv2 cross network. ``row_wise_min_rows``,
    ``stack_size`` and ``row_align`` fix how tables are stored for sharding
    (see the module docstring)."""

    table_sizes: tuple[int, ...]
    multi_hot: tuple[int, ...]
    embed_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    interaction: str = "dcnv2"
    cross_layers: int = 3
    cross_rank: int = 512
    dense_features: int = 13
    dtype: str = "float32"      # parameter and activation dtype
    row_wise_min_rows: int = 21000
    stack_size: int = 8
    row_align: int = 576

    def __post_init__(self):
        for name in ("table_sizes", "multi_hot", "bottom_mlp", "top_mlp"):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or not value
                    or any(not _is_positive_int(v) for v in value)):
                raise ValueError(f"Config: {name} must be a non-empty tuple of positive ints, "
                                 f"got {value!r}")
        for name in ("embed_dim", "cross_layers", "cross_rank", "dense_features",
                     "row_wise_min_rows", "stack_size", "row_align"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"Config: {name} must be a positive int, got {getattr(self, name)!r}")
        if len(self.multi_hot) != len(self.table_sizes):
            raise ValueError(f"Config: multi_hot has {len(self.multi_hot)} entries for "
                             f"{len(self.table_sizes)} tables; give one per table")
        if self.bottom_mlp[-1] != self.embed_dim:
            raise ValueError(f"Config: the bottom MLP must end at embed_dim {self.embed_dim}, "
                             f"got bottom_mlp {self.bottom_mlp}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"Config: the top MLP must end at 1 (the CTR logit), got top_mlp "
                             f"{self.top_mlp}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"Config: interaction must be one of {INTERACTIONS}, got "
                             f"{self.interaction!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"Config: dtype must be a floating-point dtype, got {self.dtype!r}")

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def param_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def cross_width(self) -> int:
        """N: the width of the concatenated bottom-MLP and pooled vectors."""
        return (self.num_tables + 1) * self.embed_dim

    @property
    def interaction_width(self) -> int:
        """Input width of the top MLP."""
        if self.interaction == "dot":
            f = self.num_tables + 1
            return self.embed_dim + f * (f - 1) // 2
        return self.cross_width

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def preset(name: str) -> "Config":
        """A configuration by name (see ``PRESETS``)."""
        return presets.lookup(PRESETS, name)


def _is_positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


# mlcommons/training recommendation_v2/torchrec_dlrm/README.MD ("Running the MLPerf
# DLRM v2 benchmark"): --num_embeddings_per_feature (Criteo 1TB, every table capped at
# 40M rows, mlcommons/inference --max-ind-range=40000000) and --multi_hot_sizes
MLPERF_TABLE_SIZES = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956,
                      405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000,
                      590152, 12973, 108, 36)
MLPERF_MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

# Tiny tables (assumption: sizes that exercise every storage form: two tables over
# row_wise_min_rows, one stack of four small tables, two small tables left over from
# the stack, rows not multiples of row_align, multi-hot widths that differ in a stack)
_TINY_TABLES = dict(table_sizes=(1001, 603, 64, 45, 32, 20, 12, 7),
                    multi_hot=(3, 2, 1, 4, 1, 2, 1, 3), embed_dim=16, bottom_mlp=(32, 16),
                    top_mlp=(64, 32, 1), cross_layers=2, cross_rank=8,
                    row_wise_min_rows=500, stack_size=4, row_align=8)

PRESETS: dict[str, Config] = {
    # small shapes that run in the tests (DCNv2 and dot interaction)
    "tiny": Config(interaction="dcnv2", **_TINY_TABLES),
    "tiny-dot": Config(interaction="dot", **_TINY_TABLES),
    # MLPerf DLRM-DCNv2 (see the module docstring for every source). Storage:
    # row_wise_min_rows 21000 is the size split of keras-team/keras-rs
    # examples/mlperf_dlrm_dcnv2 (model_config.embedding_threshold = 21000: smaller
    # tables are kept whole, larger ones sharded); with stack_size 8 the 17 small
    # tables make two table-wise stacks (one of one-id bags, one of bags of up to 6
    # ids) and the one with the widest bags (11,938 rows, 9 ids) is stored alone.
    # row_align 576 = lcm(64, 9) (derived: every mesh axis of 2..72 devices that
    # divides 72 or is a power of two splits the rows evenly; at most 575 padding rows).
    "mlperf-dcnv2": Config(table_sizes=MLPERF_TABLE_SIZES, multi_hot=MLPERF_MULTI_HOT,
                           embed_dim=128, bottom_mlp=(512, 256, 128),
                           top_mlp=(1024, 1024, 512, 256, 1), interaction="dcnv2",
                           cross_layers=3, cross_rank=512, dtype="float32",
                           row_wise_min_rows=21000, stack_size=8, row_align=576),
}


# ------------------------------------------------------------ how tables are stored

@dataclasses.dataclass(frozen=True)
class TableGroup:
    """Tables stored in one parameter: one table (``placement`` "row_wise",
    shape (rows, D)) or a stack of T (``"table_wise"``, shape (T, rows, D)).
    ``rows`` is the stored (padded) row count of each table; ``width`` the
    ids per sample of the group's bags (the widest table's multi-hot size)."""

    name: str
    tables: tuple[int, ...]
    placement: str
    rows: int
    width: int

    def shape(self, dim: int) -> tuple[int, ...]:
        if self.placement == "row_wise":
            return (self.rows, dim)
        return (len(self.tables), self.rows, dim)


@functools.lru_cache(maxsize=None)
def table_plan(cfg: Config) -> tuple[TableGroup, ...]:
    """How ``cfg``'s tables are stored (see the module docstring): single
    tables first (by table index), then the stacks."""
    sizes, hot = cfg.table_sizes, cfg.multi_hot
    small = sorted((t for t in range(cfg.num_tables) if sizes[t] < cfg.row_wise_min_rows),
                   key=lambda t: (hot[t], sizes[t], t))
    full = len(small) // cfg.stack_size * cfg.stack_size
    stacks = [tuple(small[k:k + cfg.stack_size]) for k in range(0, full, cfg.stack_size)]
    stacked = {t for s in stacks for t in s}
    singles = [t for t in range(cfg.num_tables) if t not in stacked]
    align = cfg.row_align
    groups = [TableGroup(f"table_{t}", (t,), "row_wise", -(-sizes[t] // align) * align, hot[t])
              for t in singles]
    groups += [TableGroup(f"stack_{k}", s, "table_wise", max(sizes[t] for t in s),
                          max(hot[t] for t in s)) for k, s in enumerate(stacks)]
    return tuple(groups)


def padding(cfg: Config) -> dict[str, int]:
    """What storing the tables for sharding costs: ``rows`` (padding rows over
    all tables), ``bytes`` (their HBM at the config's dtype) and ``id_slots``
    (padding ids per sample in the stacks' bags, which the lookup kernel reads
    and skips)."""
    rows = slots = 0
    for g in table_plan(cfg):
        rows += sum(g.rows - cfg.table_sizes[t] for t in g.tables)
        slots += sum(g.width - cfg.multi_hot[t] for t in g.tables)
    return {"rows": rows, "bytes": rows * cfg.embed_dim * cfg.param_dtype.itemsize,
            "id_slots": slots}


# ------------------------------------------------------------ parameters

def _mlp_shapes(widths: tuple[int, ...], fan_in: int) -> dict:
    shapes = {}
    for i, out in enumerate(widths):
        shapes[f"w{i}"], shapes[f"b{i}"] = (fan_in, out), (out,)
        fan_in = out
    return shapes


def _param_shapes_dict(cfg: Config) -> dict:
    """Shapes of the parameter dict (see the module docstring)."""
    shapes = {"bottom_mlp": _mlp_shapes(cfg.bottom_mlp, cfg.dense_features),
              "tables": {g.name: g.shape(cfg.embed_dim) for g in table_plan(cfg)}}
    if cfg.interaction == "dcnv2":
        n, r = cfg.cross_width, cfg.cross_rank
        shapes["cross"] = {f"{name}{l}": shape for l in range(cfg.cross_layers)
                           for name, shape in (("v", (n, r)), ("u", (r, n)), ("b", (n,)))}
    shapes["top_mlp"] = _mlp_shapes(cfg.top_mlp, cfg.interaction_width)
    return shapes


def param_shapes(cfg: Config) -> dict:
    """ShapeDtypeStructs of the parameter dict of ``cfg`` (no memory allocated:
    the MLPerf model's 40M-row tables are fine)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, cfg.param_dtype), _param_shapes_dict(cfg),
                        is_leaf=lambda s: isinstance(s, tuple))


def param_count(cfg: Config) -> int:
    """Parameters of the model itself (table rows as published, no padding)."""
    dense = sum(math.prod(s) for name, group in _param_shapes_dict(cfg).items() if name != "tables"
                for s in group.values())
    return sum(cfg.table_sizes) * cfg.embed_dim + dense


def _fan_in(entries: dict, name: str) -> int:
    """Input width of the layer a dense parameter belongs to."""
    if "u0" in entries:  # cross layers: x @ v_l (N -> r), then @ u_l (r -> N) + b_l
        return entries[("v" if name[0] == "v" else "u") + name[1:]][0]
    return entries["w" + name[1:]][0]


def _init_from_uniform(cfg: Config, part: str, name: str, u):
    """One parameter from uniforms ``u`` in [-1, 1) of its shape. Table rows
    uniform in +-sqrt(1 / rows) (TorchRec's ``EmbeddingBagConfig`` default),
    padding rows zero; weights uniform with std 1/sqrt(fan_in); biases uniform
    in +-1/sqrt(fan_in) (PyTorch ``nn.Linear``'s default; TorchRec starts the
    cross biases at zero, nonzero here so that a misplaced bias shows)."""
    if part == "tables":
        group = next(g for g in table_plan(cfg) if g.name == name)
        rows = np.array([cfg.table_sizes[t] for t in group.tables])[:, None, None]
        value = u.reshape(len(group.tables), group.rows, cfg.embed_dim) * np.sqrt(1.0 / rows)
        value = jnp.where(np.arange(group.rows)[None, :, None] < rows, value, 0.0)
        return value[0] if group.placement == "row_wise" else value
    fan_in = _fan_in(_param_shapes_dict(cfg)[part], name)
    return u * (1.0 / math.sqrt(fan_in) if name.startswith("b") else math.sqrt(3.0 / fan_in))


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: Config, key) -> dict:
    """Freshly initialized parameters of ``cfg`` (``_init_from_uniform``), all
    sliced from one uniform draw so that building a model costs one small
    program. Use ``param_shapes`` for models too large to build."""
    shapes = _param_shapes_dict(cfg)
    total = sum(math.prod(s) for group in shapes.values() for s in group.values())
    draws = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    params: dict[str, Any] = {}
    offset = 0
    for part, group in shapes.items():
        params[part] = {}
        for name, shape in group.items():
            u = draws[offset:offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
            params[part][name] = _init_from_uniform(cfg, part, name, u).astype(cfg.param_dtype)
    return params


# ------------------------------------------------------------ inputs

def _check_inputs(cfg: Config, dense, sparse):
    """``dense`` as a (B, dense_features) float array and ``sparse`` as a tuple
    of (B, multi_hot[t]) integer arrays, or a ValueError/TypeError naming the
    argument, what it got and what it expected."""
    dense = dense if hasattr(dense, "shape") else np.asarray(dense)
    if dense.ndim != 2 or dense.shape[1] != cfg.dense_features:
        raise ValueError(f"dlrm.forward: dense must have shape (B, {cfg.dense_features}), got "
                         f"{tuple(dense.shape)}")
    if not jnp.issubdtype(dense.dtype, jnp.floating):
        raise TypeError(f"dlrm.forward: dense must be a floating-point array, got dtype "
                        f"{np.dtype(dense.dtype).name}")
    b = dense.shape[0]
    if not isinstance(sparse, (tuple, list)) or len(sparse) != cfg.num_tables:
        got = f"a {type(sparse).__name__} of {len(sparse)}" if isinstance(sparse, (tuple, list)) \
            else f"a {type(sparse).__name__}"
        raise ValueError(f"dlrm.forward: sparse must be a tuple of {cfg.num_tables} id arrays (one "
                         f"per table), got {got}")
    ids = []
    for t, x in enumerate(sparse):
        x = x if hasattr(x, "shape") else np.asarray(x)
        if tuple(x.shape) != (b, cfg.multi_hot[t]):
            raise ValueError(f"dlrm.forward: sparse[{t}] must have shape (B, multi_hot[{t}]) = "
                             f"({b}, {cfg.multi_hot[t]}), got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"dlrm.forward: sparse[{t}] must be an integer id array, got dtype "
                            f"{np.dtype(x.dtype).name}")
        ids.append(x)
    return dense, tuple(ids)


# ------------------------------------------------------------ the model, functionally

class _Layout(NamedTuple):
    """Where the batch and the tables are split on a mesh (None: not split)."""

    mesh: Any
    batch: str | None
    tables: str | None
    sizes: dict


def _mlp(w: dict, x, relu_last: bool):
    n = len(w) // 2
    for i in range(n):
        x = x @ w[f"w{i}"] + w[f"b{i}"]
        if i < n - 1 or relu_last:
            x = jax.nn.relu(x)
    return x


def _constrain(x, layout: _Layout | None, spec: tuple):
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, P(*spec)))


def _stack(arrays: list, axis: int):
    """``jnp.stack`` as a concatenation of reshaped arrays, which the
    partitioner carries the other dims' splits through."""
    return jnp.concatenate([a.reshape(*a.shape[:axis], 1, *a.shape[axis:]) for a in arrays],
                           axis=axis)


def _pad_ids(ids, width: int):
    """(B, n) ids padded with -1 to (B, width)."""
    if ids.shape[1] == width:
        return ids
    return jnp.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=-1)


def _lookup(cfg: Config, tables: dict, sparse: tuple, layout: _Layout | None) -> list:
    """Pooled (B, D) of every table, in table order."""
    pooled: list = [None] * cfg.num_tables
    batch = layout.batch if layout is not None else None
    for g in table_plan(cfg):
        if g.placement == "row_wise":
            (t,) = g.tables
            out = embedding_bag(tables[g.name], sparse[t])
            pooled[t] = _constrain(out, layout, (batch, None))
            continue
        ids = _stack([_pad_ids(sparse[t], g.width) for t in g.tables], axis=0)
        out = jax.vmap(lambda table, i: embedding_bag(table, i))(tables[g.name], ids)
        out = _constrain(out, layout, (None, batch, None))
        for j, t in enumerate(g.tables):
            pooled[t] = out[j]
    return pooled


def _dot_interaction(x, pooled: list):
    """The bottom MLP's output, then the strict upper triangle of the pairwise
    dots of [x, pooled...] row by row (static slices: the batch split carries)."""
    z = _stack([x, *pooled], axis=1)
    dots = jnp.einsum("bid,bjd->bij", z, z)
    f = z.shape[1]
    return jnp.concatenate([x] + [dots[:, i, i + 1:] for i in range(f - 1)], axis=1)


def _cross_net(w: dict, x0):
    """DCNv2 low-rank cross layers: x_{l+1} = x0 * (U_l (V_l x_l) + b_l) + x_l."""
    x = x0
    for l in range(len(w) // 3):
        x = x0 * ((x @ w[f"v{l}"]) @ w[f"u{l}"] + w[f"b{l}"]) + x
    return x


def forward(cfg: Config, params: dict, dense, sparse, *, mesh=None):
    """CTR logits (B,) float32 of a batch: ``dense`` (B, dense_features) float,
    ``sparse`` a tuple of (B, multi_hot[t]) integer ids per table, -1 padded.

    ``mesh`` (the mesh the program is partitioned over) adds the sharding
    constraints of the module docstring; the values do not change."""
    dense, sparse = _check_inputs(cfg, dense, sparse)
    layout = _layout(mesh, dense.shape[0]) if mesh is not None else None
    x = _mlp(params["bottom_mlp"], dense.astype(cfg.param_dtype), relu_last=True)
    pooled = _lookup(cfg, params["tables"], sparse, layout)
    if cfg.interaction == "dot":
        z = _dot_interaction(x, pooled)
    else:
        z = _cross_net(params["cross"], jnp.concatenate([x, *pooled], axis=1))
    return _mlp(params["top_mlp"], z, relu_last=False)[:, 0].astype(jnp.float32)


# ------------------------------------------------------------ the nnx module

class _Params(nnx.Module):
    """A group of named parameters (one attribute each)."""

    def __init__(self, values: dict):
        for name, value in values.items():
            setattr(self, name, nnx.Param(value))


class DLRM(nnx.Module):
    """The model as an nnx Module; ``params()`` is its parameter dict and
    calling it runs ``forward``."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        if not isinstance(cfg, Config):
            raise TypeError(f"DLRM: cfg must be a models.dlrm.Config, got {type(cfg).__name__}")
        self.cfg = cfg
        for part, values in init_params(cfg, rngs.params()).items():
            setattr(self, part, _Params(values))

    def params(self) -> dict:
        return params_of(self)

    def __call__(self, dense, sparse, *, mesh=None):
        return forward(self.cfg, self.params(), dense, sparse, mesh=mesh)


def params_of(model: DLRM) -> dict:
    """The parameter dict of a model (see the module docstring)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ------------------------------------------------------------ synthetic Criteo-like data

# assumption: the hidden click model. A fixed logistic model of the features that the
# labels are drawn from, so that a model's AUC on synthetic data measures something:
# raw = DENSE_WEIGHT * mean(dense) + sum over tables of the mean per-id score of the bag
# (a hash of (table, id), uniform in [-1, 1]); logit = LOGIT_SCALE * (raw - mu) / sigma
# + LOGIT_BIAS, with mu and sigma the mean and deviation of raw over a fixed calibration
# sample of the config (so hot ids do not shift the click rate). LOGIT_BIAS gives
# about one click in three: less skewed than Criteo (about 3% clicks), so that small
# test batches have both classes.
DENSE_WEIGHT, LOGIT_SCALE, LOGIT_BIAS = 4.0, 2.0, -1.3
CALIBRATION_SAMPLES, CALIBRATION_SEED = 4096, 20190531  # seed: DLRM's arXiv date
# assumption: Zipf exponent of the ids (rank k drawn with probability ~ k^-1.05 over a
# table's rows: a few hot ids, a long tail, as in click logs)
ZIPF_EXPONENT = 1.05


def _hash_score(table: int, ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random score in [-1, 1) per (table, id): the 32-bit
    murmur3 finalizer of ``id + table * golden-ratio constant``."""
    x = ids.astype(np.uint32) + np.uint32((table * 0x9E3779B9) & 0xFFFFFFFF)
    for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = (x ^ (x >> np.uint32(shift))) * np.uint32(mul)
    x = x ^ (x >> np.uint32(16))
    return (x >> np.uint32(8)).astype(np.float64) / float(1 << 23) * 2.0 - 1.0


def _zipf_ids(rng: np.random.Generator, rows: int, shape) -> np.ndarray:
    """Ids with P(rank k) ~ k^-s over ``rows`` rows (inverse CDF of the
    continuous power law), scattered over the table by a multiplicative hash
    so that hot ids do not all sit in the first rows."""
    s = ZIPF_EXPONENT
    u = rng.random(shape)
    rank = np.floor((1.0 + u * (rows ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))) - 1.0
    rank = np.clip(rank, 0, rows - 1).astype(np.uint64)
    return (rank * np.uint64(2654435761) % np.uint64(rows)).astype(np.int32)


def _features(cfg: Config, batch: int, rng: np.random.Generator):
    """Synthetic NumPy ``(dense, sparse)`` (see ``synthetic_batch``)."""
    # Criteo's dense features are counts, which TorchRec's preprocessing maps to
    # log(x + 3) (pytorch/torchrec torchrec/datasets/scripts/nvt/README.md); here
    # exponential counts of mean 4 (assumption: heavy-tailed counts)
    dense = np.log(np.floor(rng.exponential(4.0, (batch, cfg.dense_features))) + 3.0)
    sparse = []
    for rows, hot in zip(cfg.table_sizes, cfg.multi_hot):
        lengths = rng.integers(1, hot + 1, (batch, 1))  # 1..hot ids, uniform
        ids = _zipf_ids(rng, rows, (batch, hot))
        sparse.append(np.where(np.arange(hot)[None, :] < lengths, ids, -1).astype(np.int32))
    return dense.astype(np.float32), tuple(sparse)


def _raw_click_score(dense, sparse) -> np.ndarray:
    """``raw`` of the hidden click model (see ``DENSE_WEIGHT``)."""
    raw = DENSE_WEIGHT * np.asarray(dense, np.float64).mean(1)
    for t, ids in enumerate(sparse):
        ids = np.asarray(ids)
        valid = ids >= 0
        score = np.where(valid, _hash_score(t, np.maximum(ids, 0)), 0.0)
        raw = raw + score.sum(1) / np.maximum(valid.sum(1), 1)
    return raw


@functools.lru_cache(maxsize=None)
def _calibration(cfg: Config) -> tuple[float, float]:
    """(mu, sigma) of the raw click score over the config's calibration sample."""
    raw = _raw_click_score(*_features(cfg, CALIBRATION_SAMPLES, np.random.default_rng(CALIBRATION_SEED)))
    return float(raw.mean()), float(raw.std()) or 1.0


def _hidden_logits(cfg: Config, dense, sparse) -> np.ndarray:
    """The hidden click model's logits (see ``DENSE_WEIGHT``)."""
    mu, sigma = _calibration(cfg)
    return LOGIT_SCALE * (_raw_click_score(dense, sparse) - mu) / sigma + LOGIT_BIAS


def synthetic_batch(cfg: Config, batch: int, key):
    """A Criteo-like batch ``(dense, sparse, labels)`` of jnp arrays: dense
    log(counts + 3) (B, dense_features) in the config's dtype; per table,
    1..multi_hot[t] ids per sample (uniform), power-law (Zipf) distributed,
    -1 padded to int32 (B, multi_hot[t]); int32 labels (B,) drawn from a
    fixed hidden logistic model of those features (``DENSE_WEIGHT``), so that
    a model's ``auc`` is meaningful. ``key``: a jax PRNG key or an int seed
    (generated with NumPy on the host: no program to compile)."""
    if not _is_positive_int(batch):
        raise ValueError(f"synthetic_batch: batch must be a positive int, got {batch!r}")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        seed = [int(key)]
    else:
        seed = np.asarray(jax.random.key_data(key)).reshape(-1).tolist()
    rng = np.random.default_rng(seed)
    dense, sparse = _features(cfg, int(batch), rng)
    clicks = rng.random(batch) < 1.0 / (1.0 + np.exp(-_hidden_logits(cfg, dense, sparse)))
    return (jnp.asarray(dense, cfg.param_dtype), tuple(jnp.asarray(s) for s in sparse),
            jnp.asarray(clicks, jnp.int32))


def auc(labels, scores) -> float:
    """ROC AUC of ``scores`` for binary ``labels``: the probability that a
    random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U statistic from average ranks)."""
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"auc: labels {labels.shape} and scores {scores.shape} must have the same "
                         f"number of entries")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("auc: labels must be 0 or 1")
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # average rank (1-based) of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------ sharding

# role -> mesh axis: the batch (MLPs, interaction) over "data", the tables over "model".
# A mesh with only one of them uses it for both (DLRM's hybrid parallelism on one axis).
SHARDING_RULES = {"batch": "data", "tables": "model"}


def _layout(mesh, batch: int) -> _Layout:
    """The mesh axes of the batch and of the tables (see ``SHARDING_RULES``);
    the batch stays whole when its axis does not divide it."""
    rules = SHARDING_RULES
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    b, t = (rules[r] if rules[r] in sizes else None for r in ("batch", "tables"))
    if b is None and t is None:
        if len(sizes) != 1:
            raise ValueError(f"dlrm.shardings: the mesh axes {list(sizes)} include neither "
                             f"{rules['batch']!r} (batch) nor {rules['tables']!r} (tables)")
        b = t = mesh.axis_names[0]
    b, t = b or t, t or b
    if batch % sizes[b]:
        b = None
    return _Layout(mesh, b, t, sizes)


def shardings(cfg: Config, mesh, batch: int) -> tuple[dict, tuple]:
    """PartitionSpecs of (params, (dense, sparse)) on ``mesh`` for a global batch.

    MLP and cross weights replicated; single tables split row-wise and stacks
    table-wise over the tables axis (replicated when the axis does not divide
    their rows / their table count); dense features split over the batch
    axis; ids split over the batch axis unless it is also the tables axis
    (row-wise lookups need every id of the batch on every device of it)."""
    if not _is_positive_int(batch):
        raise ValueError(f"dlrm.shardings: batch must be a positive int, got {batch!r}")
    layout = _layout(mesh, batch)
    t, n = layout.tables, layout.sizes[layout.tables]
    pspecs = {part: {name: P() for name in group}
              for part, group in _param_shapes_dict(cfg).items() if part != "tables"}
    pspecs["tables"] = {}
    for g in table_plan(cfg):
        split = g.rows if g.placement == "row_wise" else len(g.tables)
        axis = t if split % n == 0 else None
        pspecs["tables"][g.name] = P(axis, None) if g.placement == "row_wise" else P(axis, None, None)
    ids_axis = layout.batch if layout.batch != t else None
    sparse = tuple(P(ids_axis, None) for _ in range(cfg.num_tables))
    return pspecs, (P(layout.batch, None), sparse)


# ------------------------------------------------------------ modeled cost

def input_shapes(cfg: Config, batch: int) -> tuple:
    """ShapeDtypeStructs of ``(dense, sparse)`` for a batch."""
    dense = jax.ShapeDtypeStruct((batch, cfg.dense_features), cfg.param_dtype)
    return dense, tuple(jax.ShapeDtypeStruct((batch, h), jnp.int32) for h in cfg.multi_hot)


def estimate(cfg: Config, batch: int, *, chip=None, mesh=None, precision=None, mode="graph"):
    """``mtia_jax.estimate`` of one forward pass of ``batch`` samples from
    shapes only (the MLPerf model on one chip or a mesh in seconds); on a mesh
    with ``shardings``; ``mode``: how kernels are launched, as for
    ``mtia_jax.estimate``. Modeled queries/s = ``batch / report.time_s``."""
    fn = functools.partial(forward, cfg, mesh=mesh)
    args = (param_shapes(cfg), *input_shapes(cfg, batch))
    if mesh is None:
        return mtia_jax.estimate(fn, *args, chip=chip, precision=precision, mode=mode)
    pspecs, (dspec, sspecs) = shardings(cfg, mesh, batch)
    return mtia_jax.estimate(fn, *args, chip=chip, precision=precision, mesh=mesh,
                             in_shardings=(pspecs, dspec, sspecs), mode=mode)
