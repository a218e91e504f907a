"""Hugging Face Llama / Mixtral safetensors checkpoints for ``models.transformer``.

    model = load_hf("path/to/checkpoint_dir")                 # config.json + weights
    model = load_hf(path, cfg, quantize="mx4")                # MX weights at load
    save_hf(model, "out_dir", max_shard_bytes=2 << 30)        # sharded + index json

Tensor names and layouts are those Hugging Face ``transformers`` writes for
``LlamaForCausalLM`` and ``MixtralForCausalLM``::

    model.embed_tokens.weight                               (V, D)
    model.layers.{i}.input_layernorm.weight                 (D,)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight        (out, in): q (N*H, D),
                                                            k/v (K*H, D), o (D, N*H)
    model.layers.{i}.post_attention_layernorm.weight        (D,)
    model.layers.{i}.mlp.{gate,up}_proj.weight              (F, D)    dense layers
    model.layers.{i}.mlp.down_proj.weight                   (D, F)
    model.layers.{i}.block_sparse_moe.gate.weight           (E, D)    Mixtral router
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight (F, D)    gate
    model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight (F, D)    up
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight (D, F)    down
    model.norm.weight                                       (D,)
    lm_head.weight                                          (V, D)    absent when tied

Linear weights are stored (out, in) and transposed to the model's (in, out).
The q/k rows of HF checkpoints are already permuted for the rotate-half RoPE
that ``models.transformer`` uses (HF's ``convert_llama_weights_to_hf.py``
permutes Meta's interleaved-pair layout), so they load as they are; to load
Meta's original ``consolidated.*.pth`` weights, apply ``permute_for_rotate_half``
to wq and wk first. A sharded checkpoint has ``model.safetensors.index.json``
(``{"metadata": {"total_size": n}, "weight_map": {tensor: file}}``); an
unsharded one is ``model.safetensors``.

Files are read and written with the ``safetensors`` library, which checks a
header before any tensor is read (a JSON object whose tensors have a known
dtype, a shape and ``data_offsets`` that tile the data section exactly, no
gap, overlap or byte past the end) and memory-maps the data, so reading a
tensor touches only its own bytes. Its errors become ``CheckpointError``s
naming the file and, where one is at fault, the tensor. PyTorch pickles
(``pytorch_model.bin``, ``consolidated.*.pth``) are never loaded.

MX quantization at load (``quantize="mx8" | "mx6" | "mx4"`` or any
``mtia_jax.mx`` format): the matmul weights (attention projections, MLP and
expert projections, an untied ``lm_head``) become ``mtia_jax.mx.MXArray``s
quantized in blocks along their input axis; dense matmuls consume them
through ``mx_matmul``, MoE expert weights are dequantized on use. The
embedding table, norms and the router stay in the model dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from models.transformer import Config, RopeScaling, Transformer, _param_shapes_dict, params_of
from mtia_jax import mx

__all__ = ["CheckpointError", "load_hf", "load_hf_params", "save_hf", "hf_tensor_shapes",
           "config_to_hf", "config_from_hf", "permute_for_rotate_half", "read_safetensors",
           "read_safetensors_header", "write_safetensors", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the tensor and file."""


# ------------------------------------------------------------ safetensors

# the safetensors dtypes NumPy arrays are read and written in (the library's
# NumPy reader has no FP8: numpy itself has no float8 types)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
           "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# bits per element of every safetensors dtype, to say which tensor a header
# error is about when the library's message does not
_DTYPE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
               **{k: np.dtype(v).itemsize * 8 for k, v in _DTYPES.items()}}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: its dtype and shape."""

    dtype: np.dtype
    shape: tuple[int, ...]


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write ``tensors`` (name -> array) to a safetensors file."""
    arrays = {}
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _DTYPE_NAMES:
            raise TypeError(f"write_safetensors: tensor {name!r} has dtype {array.dtype}; "
                            f"supported: {sorted(str(d) for d in _DTYPE_NAMES)}")
        arrays[name] = array
    metadata = None if not metadata else {str(k): str(v) for k, v in metadata.items()}
    safetensors.numpy.save_file(arrays, str(path), metadata)


@contextlib.contextmanager
def _open(path):
    """A checked safetensors file (``safetensors.safe_open``); every error of
    the library, while opening or reading, a ``CheckpointError``."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            yield f
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except safetensors.SafetensorError as e:
        culprit = _culprit(path, str(e))
        about = f" (tensor {culprit!r})" if culprit else ""
        raise CheckpointError(f"{path}: not a valid safetensors file{about}: {e}") from None


def _culprit(path, error: str) -> str | None:
    """The tensor a safetensors header error is about: named by the message,
    at the JSON column it gives, or the first whose byte range disagrees
    with its dtype and shape. None when no tensor is at fault."""
    named = re.search(r"tensor `([^`]*)`", error)
    if named:
        return named.group(1)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > os.path.getsize(path):
                return None
            text = f.read(n).decode()
        column = re.search(r"line 1 column (\d+)", error)
        if column:
            keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:\s*\{', text[:int(column.group(1))])
            return json.loads(f'"{keys[-1]}"') if keys else None
        for name, entry in json.loads(text).items():
            begin, end = entry["data_offsets"]
            if name != "__metadata__" and (end - begin) * 8 != math.prod(entry["shape"]) * _DTYPE_BITS[entry["dtype"]]:
                return name
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return None


def read_safetensors_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, checked by the library."""
    with _open(path) as f:
        tensors = {}
        for name in f.keys():
            view = f.get_slice(name)
            dtype = view.get_dtype()
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which is not "
                                      f"read (supported: {sorted(_DTYPES)}); FP8 checkpoints "
                                      f"carry scales this loader does not apply: convert to BF16")
            tensors[name] = TensorInfo(np.dtype(_DTYPES[dtype]), tuple(view.get_shape()))
        return tensors, f.metadata() or {}


def read_safetensors(path, names=None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, all or ``names``."""
    tensors, _ = read_safetensors_header(path)
    with _open(path) as f:
        return {name: f.get_tensor(name) for name in tensors if names is None or name in names}


# ------------------------------------------------------------ name mapping

@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where an HF tensor goes: params[group][key][index], transposed or not."""

    hf_shape: tuple[int, ...]
    group: str | None
    key: str
    index: tuple[int, ...]
    transpose: bool


def _slots(cfg: Config) -> dict[str, _Slot]:
    """Every HF tensor name of ``cfg`` and where it goes in the parameter dict."""
    d, f, v = cfg.d_model, cfg.ffn, cfg.vocab
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    slots = {"model.embed_tokens.weight": _Slot((v, d), None, "embed", (), False),
             "model.norm.weight": _Slot((d,), None, "final_norm", (), False)}
    if not cfg.tie_embeddings:
        slots["lm_head.weight"] = _Slot((v, d), None, "lm_head", (), True)
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": ((d,), "attn_norm", False),
                 "post_attention_layernorm.weight": ((d,), "mlp_norm", False),
                 "self_attn.q_proj.weight": ((q, d), "wq", True),
                 "self_attn.k_proj.weight": ((kv, d), "wk", True),
                 "self_attn.v_proj.weight": ((kv, d), "wv", True),
                 "self_attn.o_proj.weight": ((d, q), "wo", True)}
        if not cfg.is_moe:
            layer |= {"mlp.gate_proj.weight": ((f, d), "w_gate", True),
                      "mlp.up_proj.weight": ((f, d), "w_up", True),
                      "mlp.down_proj.weight": ((d, f), "w_down", True)}
        for name, (shape, key, transpose) in layer.items():
            slots[p + name] = _Slot(shape, "layers", key, (i,), transpose)
        if cfg.is_moe:
            slots[p + "block_sparse_moe.gate.weight"] = _Slot((cfg.experts, d), "layers",
                                                               "router", (i,), True)
            for j in range(cfg.experts):
                e = f"{p}block_sparse_moe.experts.{j}."
                slots[e + "w1.weight"] = _Slot((f, d), "layers", "w_gate", (i, j), True)
                slots[e + "w3.weight"] = _Slot((f, d), "layers", "w_up", (i, j), True)
                slots[e + "w2.weight"] = _Slot((d, f), "layers", "w_down", (i, j), True)
    return slots


def hf_tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The HF tensor names of a checkpoint of ``cfg`` and their shapes."""
    return {name: slot.hf_shape for name, slot in _slots(cfg).items()}


def permute_for_rotate_half(w, heads: int):
    """Meta's interleaved-pair q/k projection (out = heads*H, in) -> the
    rotate-half row order of HF checkpoints (as HF's conversion script)."""
    w = np.asarray(w)
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


# ------------------------------------------------------------ config.json

def config_to_hf(cfg: Config) -> dict:
    """An HF ``config.json`` dict for ``cfg``."""
    out = {"architectures": ["MixtralForCausalLM" if cfg.is_moe else "LlamaForCausalLM"],
           "model_type": "mixtral" if cfg.is_moe else "llama", "vocab_size": cfg.vocab,
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.layers,
           "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
           "intermediate_size": cfg.ffn, "rope_theta": cfg.rope_theta,
           "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
           "max_position_embeddings": cfg.max_seq_len, "torch_dtype": cfg.dtype,
           "head_dim": cfg.head_dim}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                               "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_context}
    if cfg.is_moe:
        out |= {"num_local_experts": cfg.experts, "num_experts_per_tok": cfg.top_k}
    return out


def config_from_hf(hf: dict) -> Config:
    """A ``Config`` from an HF Llama/Mixtral ``config.json`` dict; a missing
    key or a value of the wrong kind is a ``CheckpointError`` naming it."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json: expected a JSON object, got {type(hf).__name__}")
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"config.json: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def _int(hf: dict, key: str, default=None) -> int:
    value = hf[key] if default is None else hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _config_from_hf(hf: dict) -> Config:
    heads = _int(hf, "num_attention_heads")
    cfg = dict(vocab=_int(hf, "vocab_size"), d_model=_int(hf, "hidden_size"),
               layers=_int(hf, "num_hidden_layers"), heads=heads,
               kv_heads=_int(hf, "num_key_value_heads", heads), ffn=_int(hf, "intermediate_size"))
    if heads <= 0 or cfg["d_model"] % heads:
        raise ValueError(f"hidden_size {cfg['d_model']} is not a positive multiple of "
                         f"num_attention_heads {heads}")
    if hf.get("head_dim") not in (None, cfg["d_model"] // heads):
        raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = "
                         f"{cfg['d_model'] // heads}; not supported")
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
        scaling = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]),
                              _int(scaling, "original_max_position_embeddings"))
    dtype = hf.get("torch_dtype") or "bfloat16"
    return Config(**cfg, rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  experts=_int(hf, "num_local_experts", 0),
                  top_k=_int(hf, "num_experts_per_tok", 2),
                  max_seq_len=_int(hf, "max_position_embeddings", 8192),
                  dtype=str(dtype).replace("torch.", ""))


# ------------------------------------------------------------ loading

def _read_json(path: Path, what: str) -> dict:
    """A JSON object file (``config.json``, the index) or a CheckpointError."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the {what}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} is a JSON {type(value).__name__}, "
                              f"not an object")
    return value


# weight files of other formats: named in the error, never opened (pickles run code)
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.00.pth")


def _weight_files(path: Path) -> tuple[dict[str, str], Path]:
    """(tensor name -> file name from the index, or {} unsharded; directory)."""
    if path.is_file():
        return {}, path.parent
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> "
                                  f"file name in {path}")
        return weight_map, path
    if (path / SINGLE_FILE).is_file():
        return {}, path
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (no {INDEX_FILE} or "
                              f"{SINGLE_FILE})")
    pickles = [name for name in _PICKLES if (path / name).exists()]
    hint = (f"; {pickles[0]} is a PyTorch pickle, which is never loaded: convert it to "
            f"safetensors first" if pickles else "")
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE} (and not a safetensors "
                          f"file){hint}")


def _catalogue(path: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of the checkpoint: name -> (file, info)."""
    weight_map, directory = _weight_files(path)
    files = sorted(set(weight_map.values())) if weight_map else [
        path.name if path.is_file() else SINGLE_FILE]
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            users = sorted(t for t, f in weight_map.items() if f == name)[:3]
            raise CheckpointError(f"{directory / INDEX_FILE}: maps {users} to {name}, which "
                                  f"does not exist")
        tensors, _ = read_safetensors_header(file)
        for tensor, info in tensors.items():
            if weight_map and weight_map.get(tensor) != name:
                raise CheckpointError(f"unexpected tensor {tensor!r} in {file}: the index maps "
                                      f"it to {weight_map.get(tensor)!r}")
            found[tensor] = (file, info)
    missing_from_files = sorted(set(weight_map) - set(found))
    if missing_from_files:
        t = missing_from_files[0]
        raise CheckpointError(f"missing tensor {t!r}: {directory / INDEX_FILE} maps it to "
                              f"{weight_map[t]}, which does not contain it")
    return found


def _quantizer(quantize: str | None) -> Callable | None:
    if quantize is None:
        return None
    fmt = mx.get_format(quantize)  # raises naming the known formats
    return lambda w: mx.quantize(w, fmt, axis=-2)  # blocks along the input axis


_QUANTIZED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def load_hf_params(path, cfg: Config, *, quantize: str | None = None, dtype=None) -> dict:
    """The parameter dict of ``cfg`` from an HF checkpoint (a directory with
    ``model.safetensors`` or an index, or one ``.safetensors`` file).

    ``dtype``: the parameter dtype (default ``cfg.dtype``). ``quantize``: an
    MX format for the matmul weights (see the module docstring). Raises
    ``CheckpointError`` naming the tensor, the file and the expected shape
    for missing, unexpected or mis-shaped tensors."""
    path = Path(path)
    dtype = np.dtype(jnp.dtype(cfg.dtype if dtype is None else dtype))
    found, slots = _catalogue(path), _slots(cfg)
    missing = [n for n in slots if n not in found]
    if missing:
        shown = ", ".join(f"{n!r} {slots[n].hf_shape}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        files = sorted({str(f) for f, _ in found.values()}) or [str(path)]
        raise CheckpointError(f"missing tensor(s) {shown}{more} (expected shape in HF (out, in) "
                              f"layout) for a {cfg.layers}-layer model; searched {files}")
    for name, (file, info) in found.items():
        if name not in slots and not (name == "lm_head.weight" and cfg.tie_embeddings):
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: not part of a "
                                  f"{cfg.layers}-layer {'MoE' if cfg.is_moe else 'dense'} model "
                                  f"with tie_embeddings={cfg.tie_embeddings}")
        if name in slots and info.shape != slots[name].hf_shape:
            raise CheckpointError(f"tensor {name!r} in {file} has shape {info.shape}; expected "
                                  f"{slots[name].hf_shape} (HF (out, in) layout)")

    shapes = jax.tree.map(lambda s: s.shape, _shapes(cfg))
    params = {k: np.empty(v, dtype) for k, v in shapes.items() if k != "layers"}
    params["layers"] = {k: np.empty(v, dtype) for k, v in shapes["layers"].items()}
    by_file: dict[Path, list[str]] = {}
    for name in slots:
        by_file.setdefault(found[name][0], []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                slot, value = slots[name], f.get_tensor(name).astype(dtype)
                target = params if slot.group is None else params[slot.group]
                target[slot.key][slot.index] = value.T if slot.transpose else value
    if "lm_head.weight" in found and cfg.tie_embeddings:  # a tied head saved explicitly
        (head,) = read_safetensors(found["lm_head.weight"][0], ["lm_head.weight"]).values()
        if head.shape != params["embed"].shape or not np.array_equal(head.astype(dtype), params["embed"]):
            raise CheckpointError(f"tensor 'lm_head.weight' in {found['lm_head.weight'][0]} "
                                  f"differs from model.embed_tokens.weight, but the config ties "
                                  f"them (tie_word_embeddings=true)")
    params = jax.tree.map(jnp.asarray, params)
    quantizer = _quantizer(quantize)
    if quantizer is not None:
        params["layers"] = {k: quantizer(v) if k in _QUANTIZED else v
                            for k, v in params["layers"].items()}
        if "lm_head" in params:
            params["lm_head"] = quantizer(params["lm_head"])
    return params


def _shapes(cfg: Config) -> dict:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, cfg.param_dtype), _param_shapes_dict(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def load_hf(path, cfg: Config | None = None, *, quantize: str | None = None,
            dtype=None) -> Transformer:
    """A ``Transformer`` from an HF checkpoint; ``cfg`` defaults to the
    checkpoint's ``config.json``. See ``load_hf_params``."""
    path = Path(path)
    if cfg is None:
        config = (path if path.is_dir() else path.parent) / CONFIG_FILE
        if not config.is_file():
            raise CheckpointError(f"{config}: not found; pass cfg= to load_hf")
        try:
            cfg = config_from_hf(_read_json(config, "model config"))
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(f"{CONFIG_FILE}:", f"{config}:", 1)) from None
    if dtype is not None:
        cfg = cfg.replace(dtype=str(np.dtype(jnp.dtype(dtype))))
    return Transformer.from_params(cfg, load_hf_params(path, cfg, quantize=quantize))


# ------------------------------------------------------------ saving

def save_hf(model, path, cfg: Config | None = None, *, max_shard_bytes: int | None = None,
            write_config: bool = True) -> list[Path]:
    """Write ``model`` (a ``Transformer``, or a parameter dict with ``cfg``) as
    an HF checkpoint in directory ``path``: ``model.safetensors``, or shards
    of at most ``max_shard_bytes`` (each tensor whole) with the index json;
    and ``config.json``. Returns the files written."""
    if isinstance(model, Transformer):
        cfg, params = model.cfg, params_of(model)
    elif cfg is None:
        raise TypeError("save_hf: pass cfg= with a parameter dict")
    else:
        params = model
    if any(isinstance(leaf, mx.MXArray) for leaf in
           jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, mx.MXArray))):
        raise TypeError("save_hf: the model holds MX-quantized weights; save the float model "
                        "(HF checkpoints store float weights)")
    tensors = {}
    for name, slot in _slots(cfg).items():
        source = params if slot.group is None else params[slot.group]
        value = np.asarray(source[slot.key])[slot.index]
        tensors[name] = np.ascontiguousarray(value.T if slot.transpose else value)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    written = []
    if write_config:
        (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg), indent=2))
        written.append(path / CONFIG_FILE)
    if max_shard_bytes is None:
        write_safetensors(path / SINGLE_FILE, tensors, {"format": "pt"})
        return written + [path / SINGLE_FILE]
    shards: list[dict] = [{}]
    for name, value in tensors.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + value.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = value
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / file, shard, {"format": "pt"})
        weight_map |= {name: file for name in shard}
        written.append(path / file)
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return written + [path / INDEX_FILE]
