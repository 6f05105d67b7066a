"""Our GGUF parser and dequantizers vs the `gguf` package (writer, reader and quants as oracles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from tierlm.loader.gguf import GGUFError, GGUFFile, dequantize
from tierlm.loader.weights import _unpermute

ROWS, COLS = 8, 512


def _raw_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose fp16 scale fields are finite, for formats we cannot quantize to."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin at bytes 0..3
        raw[:, 0:4] = np.frombuffer(np.array([0.01, 0.002] * len(raw), np.float16).tobytes(), np.uint8).reshape(-1, 4)
    if qtype == Q.Q6_K:  # d at the last 2 bytes
        raw[:, -2:] = np.frombuffer(np.full(len(raw), 0.01, np.float16).tobytes(), np.uint8).reshape(-1, 2)
    return raw


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.name", "tiny ünïcode")
    w.add_array("test.strings", ["a", "bc", "", "日本"])
    w.add_array("test.ints", [1, -2, 3])
    data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    w.add_tensor("f32", data)
    w.add_tensor("f16", data.astype(np.float16))
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        w.add_tensor(qtype.name, quants.quantize(data, qtype), raw_dtype=qtype)
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w.add_tensor(qtype.name, _raw_blocks(qtype, rng).reshape(ROWS, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_matches_reference_reader(gguf_file):
    ours = GGUFFile(gguf_file)
    assert ours.metadata["test.u32"] == 7 and ours.metadata["test.f32"] == 0.5
    assert ours.metadata["test.flag"] is True
    assert ours.metadata["test.name"] == "tiny ünïcode"
    assert ours.metadata["test.strings"] == ["a", "bc", "", "日本"]
    assert ours.metadata["test.ints"] == [1, -2, 3]
    ref = GGUFReader(gguf_file)
    assert {t.name for t in ref.tensors} == set(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.ggml_type == t.tensor_type and mine.shape == tuple(reversed([int(d) for d in t.shape]))
        assert mine.raw.tobytes() == np.asarray(t.data).tobytes()


@pytest.mark.parametrize("name", ["f32", "f16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_matches_gguf_quants(gguf_file, name):
    t = GGUFFile(gguf_file).tensors[name]
    ref = quants.dequantize(t.raw, Q(t.ggml_type)).reshape(t.shape)
    ours = t.dequantize()
    assert ours.shape == (ROWS, COLS) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.tensor(np.asarray(ref, np.float32)), rtol=0, atol=0)


def test_quantized_formats_are_close_to_source(gguf_file):
    g = GGUFFile(gguf_file)
    exact = g.tensors["f32"].dequantize()
    for name, tol in (("Q8_0", 0.02), ("Q4_0", 0.3), ("Q4_1", 0.3)):
        assert (g.tensors[name].dequantize() - exact).abs().max() < tol


def test_bundled_file_tensor_directory(smollm2_path):
    g = GGUFFile(smollm2_path)
    assert g.architecture == "llama" and len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    t = g.tensors["blk.0.ffn_gate.weight"]
    assert t.type_name == "Q4_1" and t.shape == (1536, 576)
    ref = quants.dequantize(t.raw, Q.Q4_1).reshape(t.shape)
    assert torch.equal(dequantize(t.raw, t.ggml_type, t.shape), torch.from_numpy(ref.astype(np.float32)))


def test_unpermute_inverts_llama_cpp_permute():
    n_head, head_dim, cols = 3, 8, 5
    w = torch.arange(n_head * head_dim * cols, dtype=torch.float32).reshape(n_head * head_dim, cols)
    # llama.cpp convert_hf_to_gguf permute
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(_unpermute(permuted, n_head), w)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(bad)
