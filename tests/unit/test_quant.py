"""Weight-only quantized formats: GGUF 4-bit blocks map onto the int4 kernel unchanged,
the kernels agree with a dense product on the same weights, give a row the same bits at
any batch size, and a Linear runs each row in the format its role asks for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tierlm.kv_cache import prefix_hash
from tierlm.layers import quant
from tierlm.layers.linear import Linear
from tierlm.loader.gguf import GGUFFile


def _gguf_tensor(path, type_name: str):
    return next(t for t in GGUFFile(path).tensors.values() if t.type_name == type_name and len(t.shape) == 2)


def test_q4_1_and_q4_k_blocks_map_exactly(smollm2_path, gemma3_path):
    for path, kind in ((smollm2_path, "Q4_1"), (gemma3_path, "Q4_K")):
        t = _gguf_tensor(path, kind)
        q = quant.gguf_q4(t.raw, t.ggml_type, t.shape)
        assert q is not None and q.codes.max() <= 15
        assert torch.equal(q.dequantize(), t.dequantize()), kind  # same floats as the file's own dequantizer


def test_q4_0_blocks_map_exactly():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q4_0).reshape(-1).view(np.uint8)
    q = quant.gguf_q4(raw, int(GGMLQuantizationType.Q4_0), (8, 64))
    expected = quants.dequantize(raw, GGMLQuantizationType.Q4_0).reshape(8, 64)
    assert torch.allclose(q.dequantize(), torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert quant.gguf_q4(raw, int(GGMLQuantizationType.Q8_0), (8, 64)) is None  # not a 4-bit type


def test_quantize_q4_error_within_half_a_step():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q = quant.quantize_q4(w)
    step = q.scale.repeat_interleave(quant.GROUP, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_q4(torch.randn(4, 40))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kernel_matches_dense_product_and_is_batch_invariant(kind):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(192, 256, generator=gen)
    q = quant.Int4Weight(quant.quantize_q4(w)) if kind == "int4" else quant.Int8Weight(w)
    x = torch.randn(40, 256, generator=gen).bfloat16()
    y = q.mm(x)
    ref = x.float() @ q.dequantize().t()
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    for m in (1, 2, 3, 5, 8, 17, 33):
        assert torch.equal(q.mm(x[:m]), y[:m]), m  # no tiling needed: the kernel is row-invariant


def test_int8_output_slices_give_the_same_bits():
    gen = torch.Generator().manual_seed(4)
    q = quant.Int8Weight(torch.randn(200, 128, generator=gen))
    x = torch.randn(9, 128, generator=gen).bfloat16()
    whole = torch.ops.aten._weight_int8pack_mm(x, q.qweight, q.scale)
    q.N_SLICE = 64  # 200 outputs in slices of 64, 64, 64, 8
    assert torch.equal(q.mm(x), whole)


def test_linear_rows_take_the_format_of_their_role():
    gen = torch.Generator().manual_seed(3)
    layer = Linear(128, 64, deterministic=True)
    layer.set_quantized(quant.Int4Weight(quant.quantize_q4(torch.randn(64, 128, generator=gen))))
    assert layer.weight.numel() == 0  # dense copy built on first prefill use
    x = torch.randn(10, 128, generator=gen).bfloat16()
    dense_all, quant_all = layer(x, dense_rows=10), layer(x, dense_rows=0)
    assert layer.weight.shape == (64, 128)
    mixed = layer(x, dense_rows=4)
    assert torch.equal(mixed[:4], dense_all[:4]) and torch.equal(mixed[4:], quant_all[4:])
    assert not torch.equal(dense_all, quant_all)  # two formats really run


def test_generated_blocks_hash_apart_from_prompt_blocks():
    ids = list(range(40))
    plain, marked = [], []
    prefix_hash.extend(plain, ids, 8, b"root")
    prefix_hash.extend(marked, ids, 8, b"root", generated_from=20)
    assert marked[:2] == plain[:2]  # blocks wholly inside the prompt are shared
    assert all(a != b for a, b in zip(marked[2:], plain[2:]))


def test_dense_copy_from_the_codes_is_the_kernels_weight():
    """The loader builds prompt rows' dense copy from the Q4 codes (no K-row GEMM through the
    kernel): exactly the weights the kernel reports (bf16 scale and zero, bf16 values)."""
    gen = torch.Generator().manual_seed(5)
    q4 = quant.quantize_q4(torch.randn(48, 96, generator=gen))
    kernel = quant.Int4Weight(q4)
    view = quant.Int4Weight.kernel_view(q4)
    assert view.dtype == torch.float32
    assert torch.equal(view, kernel.dequantize())
