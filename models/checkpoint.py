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

The safetensors format is read and written here with NumPy (no dependency):

    8 bytes   little-endian uint64 N: the header length
    N bytes   UTF-8 JSON: {tensor name: {"dtype": "F32" | "BF16" | ...,
              "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}
              (padded with spaces to a multiple of 8 bytes)
    data      each tensor's bytes, C order, little-endian, at [begin, end)
              counted from the end of the header

MX quantization at load (``quantize="mx8" | "mx6" | "mx4"`` or any
``mtia_jax.mx`` format): the matmul weights (attention projections, MLP and
expert projections, an untied ``lm_head``) become ``mtia_jax.mx.MXArray``s
quantized in blocks along their input axis; dense matmuls consume them
through ``mx_matmul``, MoE expert weights are dequantized on use. The
embedding table, norms and the router stay in the model dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

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

# safetensors dtype names <-> NumPy dtypes
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape and absolute byte range."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write ``tensors`` (name -> NumPy array) to a safetensors file."""
    header, offset, arrays = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _DTYPE_NAMES:
            raise TypeError(f"write_safetensors: tensor {name!r} has dtype {array.dtype}; "
                            f"safetensors supports {sorted(str(d) for d in _DTYPE_NAMES)}")
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def read_safetensors_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} bytes, "
                                  f"file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON: {e}") from None
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, entry in header.items():
        if entry.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                                  f"{entry.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > size - 8 - n:
            raise CheckpointError(f"{path}: tensor {name!r} ({entry['dtype']}{list(shape)}) has "
                                  f"data_offsets [{begin}, {end}] that do not fit its shape or "
                                  f"the file")
        tensors[name] = TensorInfo(dtype, shape, 8 + n + begin, 8 + n + end)
    return tensors, metadata


def read_safetensors(path, names=None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file (memory-mapped, read-only), all or ``names``."""
    tensors, _ = read_safetensors_header(path)
    return {name: _read(path, info) for name, info in tensors.items()
            if names is None or name in names}


def _read(path, info: TensorInfo) -> np.ndarray:
    if info.end == info.begin:
        return np.zeros(info.shape, info.dtype)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=info.begin,
                     shape=(info.end - info.begin,))
    return data.view(info.dtype.newbyteorder("<")).reshape(info.shape)


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
    """A ``Config`` from an HF Llama/Mixtral ``config.json`` dict."""
    try:
        heads = int(hf["num_attention_heads"])
        cfg = dict(vocab=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
                   layers=int(hf["num_hidden_layers"]), heads=heads,
                   kv_heads=int(hf.get("num_key_value_heads", heads)),
                   ffn=int(hf["intermediate_size"]))
    except KeyError as e:
        raise CheckpointError(f"config.json: missing key {e.args[0]!r}") from None
    if hf.get("head_dim") not in (None, cfg["d_model"] // heads):
        raise CheckpointError(f"config.json: head_dim {hf['head_dim']} != hidden_size / "
                              f"num_attention_heads = {cfg['d_model'] // heads}; not supported")
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported "
                                  f"(only 'llama3')")
        scaling = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]),
                              int(scaling["original_max_position_embeddings"]))
    dtype = hf.get("torch_dtype") or "bfloat16"
    return Config(**cfg, rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  experts=int(hf.get("num_local_experts", 0)),
                  top_k=int(hf.get("num_experts_per_tok", 2)),
                  max_seq_len=int(hf.get("max_position_embeddings", 8192)),
                  dtype=str(dtype).replace("torch.", ""))


# ------------------------------------------------------------ loading

def _weight_files(path: Path) -> tuple[dict[str, str], Path]:
    """(tensor name -> file name from the index, or {} unsharded; directory)."""
    if path.is_file():
        return {}, path.parent
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        return weight_map, path
    if (path / SINGLE_FILE).is_file():
        return {}, path
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE} (and not a safetensors file)")


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
        if name not in slots:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                tied = _read(file, info)
                embed_file, embed_info = found["model.embed_tokens.weight"]
                if tied.shape == embed_info.shape and np.array_equal(tied, _read(embed_file, embed_info)):
                    continue  # a tied head saved explicitly
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: not part of a "
                                  f"{cfg.layers}-layer {'MoE' if cfg.is_moe else 'dense'} model "
                                  f"with tie_embeddings={cfg.tie_embeddings}")
        if info.shape != slots[name].hf_shape:
            raise CheckpointError(f"tensor {name!r} in {file} has shape {info.shape}; expected "
                                  f"{slots[name].hf_shape} (HF (out, in) layout)")

    shapes = jax.tree.map(lambda s: s.shape, _shapes(cfg))
    params = {k: np.empty(v, dtype) for k, v in shapes.items() if k != "layers"}
    params["layers"] = {k: np.empty(v, dtype) for k, v in shapes["layers"].items()}
    for name, slot in slots.items():
        file, info = found[name]
        value = _read(file, info).astype(dtype)
        target = params if slot.group is None else params[slot.group]
        target[slot.key][slot.index] = value.T if slot.transpose else value
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
        cfg = config_from_hf(json.loads(config.read_text()))
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
