"""HF-layout safetensors checkpoints (models/checkpoint.py): the file format
byte for byte, round trips (single file and sharded index), each error case
(malformed files, configs and indexes included), MX quantization at load,
config.json and the q/k RoPE permutation."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from models import checkpoint as ck
from models import transformer as tf
from mtia_jax import mx

TINY = tf.Config.preset("tiny")
TINY_MOE = tf.Config.preset("tiny-moe")
TOKENS = (jnp.arange(10, dtype=jnp.int32)[None] * 37) % 256


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, t: tf.forward(cfg, p, t)[0])


@pytest.fixture(scope="module")
def dense():
    return tf.Transformer(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def moe():
    return tf.Transformer(TINY_MOE, rngs=nnx.Rngs(1))


def test_safetensors_files_follow_the_format_byte_for_byte(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([1.5, -2.0], ml_dtypes.bfloat16)}
    ck.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]}
    data = raw[8 + n:]
    np.testing.assert_array_equal(np.frombuffer(data[:24], "<f4").reshape(2, 3), tensors["a"])
    assert data[24:28] == np.array([1.5, -2.0], ml_dtypes.bfloat16).tobytes()
    back = ck.read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["b"], tensors["b"])
    assert back["b"].dtype == ml_dtypes.bfloat16


def test_saved_tensors_have_hf_names_and_out_in_layout(tmp_path, moe):
    ck.save_hf(moe, tmp_path)
    tensors = ck.read_safetensors(tmp_path / "model.safetensors")
    assert {n: t.shape for n, t in tensors.items()} == ck.hf_tensor_shapes(TINY_MOE)
    p = moe.params()
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"],
                                  np.asarray(p["layers"]["wq"][1]).T)
    np.testing.assert_array_equal(tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"],
                                  np.asarray(p["layers"]["w_down"][0, 3]).T)
    np.testing.assert_array_equal(tensors["model.layers.1.block_sparse_moe.gate.weight"],
                                  np.asarray(p["layers"]["router"][1]).T)
    assert "model.layers.0.mlp.gate_proj.weight" in ck.hf_tensor_shapes(TINY)


@pytest.mark.parametrize("which, shard", [("dense", None), ("moe", 40_000)])
def test_round_trip_gives_equal_logits(tmp_path, which, shard, request):
    model = request.getfixturevalue(which)
    files = ck.save_hf(model, tmp_path, max_shard_bytes=shard)
    if shard is not None:
        index = json.loads((tmp_path / ck.INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and all((tmp_path / f) in files for f in shards)
        assert index["metadata"]["total_size"] == sum(
            np.prod(s) * 4 for s in ck.hf_tensor_shapes(model.cfg).values())
    loaded = ck.load_hf(tmp_path)  # the config comes from config.json
    assert loaded.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(loaded.params()), jax.tree.leaves(model.params())):
        np.testing.assert_array_equal(a, b)
    f = _forward(model.cfg)
    np.testing.assert_array_equal(f(loaded.params(), TOKENS), f(model.params(), TOKENS))


def test_bfloat16_checkpoint_loads_into_a_float32_model(tmp_path, dense):
    cfg16 = TINY.replace(dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), dense.params())
    ck.save_hf(p16, tmp_path, cfg16)
    assert ck.read_safetensors(tmp_path / "model.safetensors")["lm_head.weight"].dtype == ml_dtypes.bfloat16
    loaded = ck.load_hf(tmp_path, TINY)
    np.testing.assert_array_equal(loaded.params()["embed"], p16["embed"].astype(jnp.float32))


def _rewrite(tmp_path, edit):
    tensors = dict(ck.read_safetensors(tmp_path / "model.safetensors"))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    ck.write_safetensors(tmp_path / "model.safetensors", tensors)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     r"missing tensor\(s\) 'model.layers.1.self_attn.k_proj.weight' \(32, 64\)"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}),
     r"unexpected tensor 'model.layers.2.mlp.up_proj.weight' in .*model.safetensors"),
    (lambda t: t.update({"model.norm.weight": np.zeros((65,), np.float32)}),
     r"tensor 'model.norm.weight' in .*model.safetensors has shape \(65,\); expected \(64,\)"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].T.copy()}),
     r"'lm_head.weight' .* has shape \(64, 256\); expected \(256, 64\)"),
])
def test_checkpoint_errors_name_the_tensor_file_and_shape(tmp_path, dense, edit, match):
    ck.save_hf(dense, tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_hf(tmp_path)


def test_sharded_index_errors(tmp_path, dense):
    ck.save_hf(dense, tmp_path, max_shard_bytes=50_000)
    index = json.loads((tmp_path / ck.INDEX_FILE).read_text())
    first = index["weight_map"]["model.embed_tokens.weight"]
    (tmp_path / first).unlink()
    with pytest.raises(ck.CheckpointError, match=f"maps .*model.embed_tokens.weight.* to {first}, "
                                                 f"which does not exist"):
        ck.load_hf(tmp_path)
    with pytest.raises(ck.CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        ck.load_hf(tmp_path / "nowhere", TINY)


def test_tied_checkpoint_without_lm_head_and_a_dense_checkpoint_into_moe(tmp_path, dense):
    tied = TINY.replace(tie_embeddings=True)
    p = {k: v for k, v in dense.params().items() if k != "lm_head"}
    ck.save_hf(p, tmp_path / "tied", tied)
    assert "lm_head.weight" not in ck.read_safetensors(tmp_path / "tied" / "model.safetensors")
    assert ck.load_hf(tmp_path / "tied").cfg.tie_embeddings
    ck.save_hf(dense, tmp_path / "dense")
    with pytest.raises(ck.CheckpointError, match="missing tensor.*block_sparse_moe"):
        ck.load_hf(tmp_path / "dense", TINY_MOE.replace(ffn=128))


@pytest.mark.parametrize("fmt, ratio", [("mx8", 3.8), ("mx4", 7.0)])
def test_mx_quantization_at_load(tmp_path, dense, fmt, ratio):
    ck.save_hf(dense, tmp_path)
    quantized = ck.load_hf(tmp_path, quantize=fmt)
    qp = quantized.params()
    assert isinstance(qp["layers"]["wq"], mx.MXArray) and isinstance(qp["lm_head"], mx.MXArray)
    assert not isinstance(qp["embed"], mx.MXArray)
    float_bytes = dense.params()["layers"]["w_up"].nbytes
    assert float_bytes / qp["layers"]["w_up"].nbytes > ratio
    # the same as the float model whose weights are dequantize(quantize(w)), computed apart
    fq = jax.tree.map(lambda a, q: q.dequantize(jnp.float32) if isinstance(q, mx.MXArray) else a,
                      dense.params(), qp, is_leaf=lambda x: isinstance(x, mx.MXArray))
    want = _forward(TINY)(fq, TOKENS)
    got = jax.jit(lambda p, t: tf.forward(TINY, p, t)[0])(qp, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    exact = _forward(TINY)(dense.params(), TOKENS)
    assert 0 < np.abs(np.asarray(got) - np.asarray(exact)).max() < 0.5 * np.abs(np.asarray(exact)).max()


def test_unknown_mx_format_is_an_error(tmp_path, dense):
    ck.save_hf(dense, tmp_path)
    with pytest.raises(ValueError, match="mx3"):
        ck.load_hf(tmp_path, quantize="mx3")


@pytest.mark.parametrize("name", sorted(tf.PRESETS))
def test_config_json_round_trip(name):
    cfg = tf.Config.preset(name)
    hf = ck.config_to_hf(cfg)
    assert ck.config_from_hf(json.loads(json.dumps(hf))) == cfg


def test_meta_to_hf_permutation_turns_interleaved_rope_into_rotate_half():
    heads, hd, d = 2, 8, 16
    rng = np.random.default_rng(0)
    wq, wk, x = rng.normal(size=(heads * hd, d)), rng.normal(size=(heads * hd, d)), rng.normal(size=(5, d))
    inv = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(5)[:, None] * inv                                     # (T, hd/2)

    def interleaved(y):  # Meta: complex numbers from pairs (2i, 2i+1)
        z = (y[..., 0::2] + 1j * y[..., 1::2]) * np.exp(1j * ang)[:, None]
        return np.stack([z.real, z.imag], -1).reshape(y.shape)

    def rotate_half(y):
        z = (y[..., :hd // 2] + 1j * y[..., hd // 2:]) * np.exp(1j * ang)[:, None]
        return np.concatenate([z.real, z.imag], -1)

    meta = [interleaved((x @ w.T).reshape(5, heads, hd)) for w in (wq, wk)]
    hf = [rotate_half((x @ ck.permute_for_rotate_half(w, heads).T).reshape(5, heads, hd))
          for w in (wq, wk)]
    np.testing.assert_allclose(np.einsum("thd,shd->hts", *hf), np.einsum("thd,shd->hts", *meta),
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ malformed files

def _raw_safetensors(path, header, data: bytes):
    """A safetensors file written byte by byte, whatever its header says."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def _f32(shape, begin):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + 4 * int(np.prod(shape))]}


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, r"tensor 'w'.*-8"),
    ({"a": _f32([4], 0), "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24,
     r"tensor 'b'.*invalid offset"),
    ({"a": _f32([2], 8)}, 16, r"tensor 'a'.*invalid offset"),                    # a gap before it
    ([1, 2, 3], 0, r"invalid type: sequence"),                                    # a JSON list
    ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, r"tensor 'w'.*missing field `shape`"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, r"tensor 'w'.*invalid shape"),
    ({"w": _f32([2], 0)}, 64, r"file not fully covered"),                         # trailing bytes
    ({"w": _f32([32], 0)}, 8, r"file not fully covered"),                         # past the end
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, 1, r"tensor 'w'.*unknown variant `Q4`"),
], ids=["negative-offset", "overlap", "gap", "list-header", "no-shape", "size-mismatch",
        "trailing-bytes", "past-the-end", "unknown-dtype"])
def test_malformed_safetensors_files_raise_checkpoint_errors_naming_file_and_tensor(
        tmp_path, header, data, match):
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * data)
    for read in (ck.read_safetensors, ck.read_safetensors_header,
                 lambda p: ck.load_hf_params(p, TINY)):
        with pytest.raises(ck.CheckpointError, match=match) as info:
            read(path)
        assert str(path) in str(info.value) and "not a valid safetensors file" in str(info.value)


def test_files_that_are_not_safetensors_or_fp8_tensors_are_refused(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ck.CheckpointError, match=r"short.safetensors: .*header too small"):
        ck.read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ck.CheckpointError, match=r"huge.safetensors: .*header too large"):
        ck.read_safetensors(tmp_path / "huge.safetensors")
    path = _raw_safetensors(tmp_path / "fp8.safetensors",
                            {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ck.CheckpointError, match=r"fp8.safetensors: tensor 'w' has dtype F8_E4M3.*BF16"):
        ck.read_safetensors(path)
    with pytest.raises(ck.CheckpointError, match=r"nowhere.safetensors: no such file"):
        ck.read_safetensors(tmp_path / "nowhere.safetensors")
    with pytest.raises(TypeError, match=r"tensor 'z' has dtype complex64"):
        ck.write_safetensors(tmp_path / "c.safetensors", {"z": np.zeros(2, np.complex64)})


def test_reading_one_tensor_returns_its_own_bytes(tmp_path):
    tensors = {"a": np.arange(4, dtype=np.float32), "b": np.full((2, 3), 7, np.int16),
               "c": np.array([1.5, -2.0], ml_dtypes.bfloat16)}
    ck.write_safetensors(tmp_path / "x.safetensors", tensors)
    (b,) = ck.read_safetensors(tmp_path / "x.safetensors", ["b"]).values()
    np.testing.assert_array_equal(b, tensors["b"])
    assert b.dtype == np.int16


@pytest.mark.parametrize("text, match", [
    ("{not json", r"config.json: cannot read the model config"),
    ("[1, 2]", r"config.json: the model config is a JSON list, not an object"),
    ('{"vocab_size": 256}', r"config.json: missing key 'num_attention_heads'"),
    ('{"vocab_size": 256, "hidden_size": "wide", "num_hidden_layers": 2, "num_attention_heads": 4, '
     '"intermediate_size": 128}', r"config.json: hidden_size must be an integer, got 'wide'"),
    ('{"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 0, '
     '"intermediate_size": 128}', r"config.json: hidden_size 64 is not a positive multiple of "
                                  r"num_attention_heads 0"),
], ids=["not-json", "list", "missing-key", "string-size", "zero-heads"])
def test_broken_config_json_is_a_checkpoint_error_naming_the_file_and_key(tmp_path, dense, text, match):
    ck.save_hf(dense, tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ck.CheckpointError, match=match) as info:
        ck.load_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


@pytest.mark.parametrize("text, match", [
    ("{broken", r"cannot read the checkpoint index"),
    ("[]", r"the checkpoint index is a JSON list"),
    ('{"metadata": {}}', r"'weight_map' must be an object"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"'weight_map' must be an object"),
    ('{"weight_map": {"model.norm.weight": "../../etc/passwd"}}', r"'weight_map' must be an object"),
], ids=["not-json", "list", "no-weight-map", "non-string-file", "path-outside"])
def test_broken_index_files_are_checkpoint_errors_naming_the_index(tmp_path, dense, text, match):
    ck.save_hf(dense, tmp_path, max_shard_bytes=50_000)
    (tmp_path / ck.INDEX_FILE).write_text(text)
    with pytest.raises(ck.CheckpointError, match=match) as info:
        ck.load_hf(tmp_path)
    assert str(tmp_path / ck.INDEX_FILE) in str(info.value)


def test_missing_directories_and_pickle_checkpoints_are_refused_without_loading(tmp_path, monkeypatch):
    with pytest.raises(ck.CheckpointError, match=r"nowhere: no such file or directory"):
        ck.load_hf(tmp_path / "nowhere", TINY)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ck.CheckpointError, match=r"pytorch_model.bin is a PyTorch pickle, which is "
                                                 r"never loaded: convert it to safetensors"):
        ck.load_hf(tmp_path, TINY)


def test_a_tensor_in_a_shard_the_index_does_not_map_it_to_and_a_differing_tied_head_are_refused(
        tmp_path, dense):
    ck.save_hf(dense, tmp_path / "sharded", max_shard_bytes=50_000, write_config=False)
    index = json.loads((tmp_path / "sharded" / ck.INDEX_FILE).read_text())
    first = tmp_path / "sharded" / index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"]["model.norm.weight"] != first.name
    ck.write_safetensors(first, {**ck.read_safetensors(first), "model.norm.weight": np.ones(64, np.float32)})
    with pytest.raises(ck.CheckpointError, match=r"unexpected tensor 'model.norm.weight' in .*the "
                                                 r"index maps it to"):
        ck.load_hf(tmp_path / "sharded", TINY)
    ck.save_hf(dense, tmp_path / "tied", TINY)        # an untied head loaded under a tied config
    with pytest.raises(ck.CheckpointError, match=r"'lm_head.weight' .* differs from "
                                                 r"model.embed_tokens.weight"):
        ck.load_hf(tmp_path / "tied", TINY.replace(tie_embeddings=True))


def test_a_tied_head_saved_explicitly_loads_when_it_equals_the_embedding(tmp_path, dense):
    tied = TINY.replace(tie_embeddings=True)
    ck.save_hf({k: v for k, v in dense.params().items() if k != "lm_head"}, tmp_path, tied)
    tensors = ck.read_safetensors(tmp_path / "model.safetensors")
    ck.write_safetensors(tmp_path / "model.safetensors",
                         {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    loaded = ck.load_hf(tmp_path)
    assert loaded.cfg.tie_embeddings
    np.testing.assert_array_equal(loaded.params()["embed"], dense.params()["embed"])
