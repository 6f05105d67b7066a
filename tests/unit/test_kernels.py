"""The compiled quantized-matmul kernels: every ISA path this CPU runs equals the PyTorch
reference bit for bit (on the bundled models' own Q4_1, Q5_0 and Q8_0 tensors and on
random blocks with odd block counts), a row's result is the same whatever else is in the batch
and whatever the thread count, the weight blocks read as gguf reads them, and the error
against float weights is what int8 activations cost."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tierlm import kernels
from tierlm.kernels import reference as ref
from tierlm.loader.gguf import GGUFFile

PATHS = kernels.supported()


@pytest.fixture(scope="module")
def bundled_tensors(smollm2_path, gemma3_path):
    """(packed weight, GGUF tensor): SmolLM2's Q4_1 projections and a slice of its Q8_0
    embedding; Gemma-3's Q5_0 and Q8_0 projections."""
    files = {"smollm2": GGUFFile(smollm2_path), "gemma3": GGUFFile(gemma3_path)}
    out = {}
    for name, rows in (("smollm2/blk.0.ffn_gate.weight", None), ("smollm2/blk.3.attn_k.weight", None),
                       ("smollm2/token_embd.weight", 640), ("gemma3/blk.0.attn_q.weight", None),
                       ("gemma3/blk.2.attn_v.weight", None),
                       ("gemma3/blk.0.attn_output.weight", None), ("gemma3/blk.0.ffn_down.weight", None)):
        model, _, tensor_name = name.partition("/")
        t = files[model].tensors[tensor_name]
        n, k = t.shape
        n = rows or n
        per_row = {ref.Q4_K: k // 256 * 144, ref.Q6_K: k // 256 * 210}.get(
            t.ggml_type, k // 32 * ref.BLOCK_BYTES.get(t.ggml_type, 0))
        raw = torch.from_numpy(np.asarray(t.raw[: n * per_row]).copy())
        out[name] = (kernels.pack(raw, t.ggml_type, n, k), t)
    return out


def random_blocks(ggml_type: int, n: int, k: int, seed: int = 0) -> ref.Packed:
    gen = torch.Generator().manual_seed(seed)
    size = {ref.Q4_K: 144, ref.Q6_K: 210}.get(ggml_type, ref.BLOCK_BYTES.get(ggml_type))
    nb = k // (256 if ggml_type in ref.SUPER else 32)
    raw = torch.randint(0, 256, (n, nb, size), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, nb, generator=gen) * 0.02 + 1e-3).half()
    at = 208 if ggml_type == ref.Q6_K else 0  # where the block's f16 d sits
    raw[..., at:at + 2] = scales.view(torch.uint8).reshape(n, nb, 2)
    if ggml_type in (*ref.OFFSET, ref.Q4_K):  # Q4_1's and Q5_1's offset, Q4_K's dmin
        mins = (-torch.rand(n, nb, generator=gen) * 0.1).half()
        raw[..., 2:4] = mins.view(torch.uint8).reshape(n, nb, 2)
    return kernels.pack(raw.reshape(-1), ggml_type, n, k)


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[-1, 5] = 40.0  # an outlier dominating its block's scale
    return x


@pytest.mark.parametrize("path", PATHS)
def test_activation_quantization_equals_reference(path):
    x = activations(9, 288)
    x[1, 32:64] = torch.arange(32) * 0.5 - 7.5  # with 127 in the block its scale is 1:
    x[1, 32] = 127.0                               # codes at exact halves, ties to even
    x[1, 64:96] = -x[1, 32:64]
    x[2, 96:128] = -2.5  # all negative: the scale from |x|
    got, want = kernels.quantize_rows(x, path), ref.quantize_rows(x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    q, d, s, total, halves = want
    blocks = q.reshape(9, 9, 32)
    assert d[0, 0] == 0 and (blocks[0, 0] == 0).all() and q.abs().max() == 127
    assert torch.equal(total, blocks.sum(-1, dtype=torch.int32)) and torch.equal(s, d * total.float())
    assert torch.equal(halves, q.reshape(9, 18, 16).sum(-1, dtype=torch.int32))


@pytest.mark.parametrize("name", ["smollm2/blk.0.ffn_gate.weight", "smollm2/blk.3.attn_k.weight",
                                  "smollm2/token_embd.weight", "gemma3/blk.0.attn_q.weight",
                                  "gemma3/blk.2.attn_v.weight", "gemma3/blk.0.attn_output.weight",
                                  "gemma3/blk.0.ffn_down.weight"])
def test_every_path_equals_the_reference_on_the_bundled_tensors(bundled_tensors, name):
    w, tensor = bundled_tensors[name]
    x = activations(5, w.in_features)
    want = ref.gemm(*ref.quantize_rows(x)[:3], w)
    for path in PATHS:
        assert torch.equal(kernels.gemm(x, w, path=path), want), path
    # The blocks read as gguf reads them, and the result is the float product up to what
    # quantizing the activations to int8 costs.
    dense = tensor.dequantize()[: w.out_features]
    assert torch.equal(ref.dequantize(w), dense)
    exact = x.double() @ dense.double().t()
    assert ((want.double() - exact).norm() / exact.norm()) < 0.01


@pytest.mark.parametrize("ggml_type,k", [(t, k) for t in (ref.Q4_0, ref.Q4_1, ref.Q5_0, ref.Q5_1, ref.Q8_0)
                                         for k in (32, 64, 288, 576)]
                         + [(t, k) for t in ref.SUPER for k in (256, 768)])  # 1, 2, 9, 18 blocks; 1, 3 super-blocks
def test_random_blocks_and_odd_shapes(ggml_type, k):
    n = 37  # not a multiple of the 8 interleaved rows
    w = random_blocks(ggml_type, n, k)
    x = activations(6, k)
    want = ref.gemm(*ref.quantize_rows(x)[:3], w)
    for path in PATHS:
        assert torch.equal(kernels.gemm(x, w, path=path), want), path


@pytest.mark.parametrize("ggml_type", ref.FORMATS)
def test_a_row_has_the_same_bits_in_any_batch_and_thread_count(ggml_type):
    n, k = 96, 768
    w = random_blocks(ggml_type, n, k, seed=3)
    x = activations(512, k, seed=4)
    for path in PATHS:
        alone = torch.cat([kernels.gemm(x[i : i + 1], w, path=path) for i in range(0, 512, 37)])
        for m in (1, 2, 3, 5, 8, 17, 64, 512):
            batch = kernels.gemm(x[:m], w, path=path)
            assert torch.equal(batch[::37], alone[: len(batch[::37])]), (path, m)
        with pool_threads(1):
            one_thread = kernels.gemm(x, w, path=path)
        with pool_threads(2):
            assert torch.equal(kernels.gemm(x, w, path=path), one_thread), path


@contextlib.contextmanager
def pool_threads(n: int):
    """The kernels' pool at n threads (torch's intra-op count restored after)."""
    before, torch_threads = kernels.use_threads(), torch.get_num_threads()
    try:
        yield kernels.use_threads(n)
    finally:
        kernels.use_threads(before)
        torch.set_num_threads(torch_threads)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env))


def test_isa_can_be_forced_lower_and_a_bad_choice_is_one_clear_error():
    assert PATHS[0] == "reference" and len(PATHS) >= 2, "the extension is not built: run `make install`"
    code = "from tierlm import kernels; print(kernels.isa())"
    for path in PATHS:
        out = run_python(code, TIERLM_ISA=path)
        assert out.returncode == 0 and out.stdout.strip() == path, out.stderr
    out = run_python(code, TIERLM_ISA="amx")
    assert out.returncode != 0 and f"TIERLM_ISA='amx': this machine runs {', '.join(PATHS)}" in out.stderr


def test_without_the_extension_the_reference_runs_after_one_warning():
    code = ("import logging, sys, torch; logging.basicConfig(); sys.modules['tierlm._kernels'] = None\n"
            "from tierlm import kernels\n"
            "from tierlm.kernels import reference as ref\n"
            "w = kernels.pack(torch.zeros(16 * 20, dtype=torch.uint8), ref.Q4_1, 16, 32)\n"
            "kernels.gemm(torch.randn(2, 32), w); kernels.gemm(torch.randn(2, 32), w)\n"
            "print(kernels.isa(), kernels.supported())")
    out = run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "reference ['reference']", out.stderr
    assert out.stderr.count("compiled kernels unavailable") == 1


# ---- attention ------------------------------------------------------------------------
def paged(seed: int, dtype: torch.dtype, heads=(9, 3), d=64, bs=16, blocks=48):
    """Random K/V caches in the kernels' layout, block tables of two sequences, queries."""
    gen = torch.Generator().manual_seed(seed)
    h, hkv = heads
    kc = torch.randn(blocks, hkv, d, bs, generator=gen).to(dtype)
    vc = torch.randn(blocks, bs, hkv, d, generator=gen).to(dtype)
    tables = torch.randperm(blocks, generator=gen)[:32].int().view(2, 16)
    q = torch.randn(64, h, d, generator=gen).to(dtype)
    return q, kc, vc, tables


# A prompt chunk of 40 tokens of sequence 0 (positions 150..189) and one decode of sequence 1.
SEQ = torch.tensor([0] * 40 + [1], dtype=torch.int32)
POS = torch.tensor([*range(150, 190), 97])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 37])
def test_attention_paths_agree_bitwise_and_match_the_reference(dtype, window):
    q, kc, vc, tables = paged(5, dtype)
    q = q[: len(SEQ)]
    want = kernels.attention(q, kc, vc, tables, SEQ, POS, window, 0.125, path="reference").double()
    outs = [kernels.attention(q, kc, vc, tables, SEQ, POS, window, 0.125, path=p) for p in PATHS[1:]]
    for path, out in zip(PATHS[1:], outs):
        assert torch.equal(out, outs[0]), path
        # float32 rounding only (bf16: the output's own rounding)
        tol = 2e-6 if dtype == torch.float32 else 2 ** -8
        assert torch.allclose(out.double(), want, atol=tol, rtol=tol), path


def test_attention_row_has_the_same_bits_alone_chunked_batched_and_threaded():
    q, kc, vc, tables = paged(6, torch.bfloat16, heads=(8, 2), d=128, bs=32)
    q = q[: len(SEQ)]
    for path in PATHS[1:]:
        whole = kernels.attention(q, kc, vc, tables, SEQ, POS, 0, 0.09, path=path)
        alone = torch.cat([kernels.attention(q[i : i + 1], kc, vc, tables, SEQ[i : i + 1], POS[i : i + 1], 0,
                                             0.09, path=path) for i in range(len(SEQ))])
        chunks = torch.cat([kernels.attention(q[a:b], kc, vc, tables, SEQ[a:b], POS[a:b], 0, 0.09, path=path)
                            for a, b in ((0, 7), (7, 8), (8, 33), (33, 41))])
        assert torch.equal(whole, alone) and torch.equal(whole, chunks), path
        for n in (1, 2):
            with pool_threads(n):
                assert torch.equal(kernels.attention(q, kc, vc, tables, SEQ, POS, 0, 0.09, path=path), whole)


def test_kv_write_places_keys_transposed_per_block():
    _, kc, vc, _ = paged(7, torch.bfloat16)
    k, v = torch.randn(5, 3, 64), torch.randn(5, 3, 64)
    slots = torch.tensor([0, 17, 18, 100, 767])
    kernels.kv_write(k, v, kc, vc, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(kc[s // 16, :, :, s % 16], k[i].to(torch.bfloat16))
        assert torch.equal(vc[s // 16, s % 16], v[i].to(torch.bfloat16))


def int8_paged(seed: int, heads=(9, 3), d=64, bs=16, blocks=48):
    """`paged`, with int8 caches (values and scales) written by the reference from random K/V."""
    q, kc, vc, tables = paged(seed, torch.float32, heads, d, bs, blocks)
    hkv = heads[1]
    k8 = torch.zeros(blocks, hkv, ref.kv_width(d), bs, dtype=torch.int8)
    v8 = torch.zeros(blocks, bs, hkv, ref.kv_width(d), dtype=torch.int8)
    slots = torch.arange(blocks * bs)
    ref.kv_write(kc.permute(0, 3, 1, 2).reshape(-1, hkv, d), vc.reshape(-1, hkv, d), k8, v8, slots)
    return q, k8, v8, tables


def test_int8_kv_write_quantizes_per_token_and_head_as_the_reference():
    gen = torch.Generator().manual_seed(21)
    k, v = torch.randn(6, 3, 64, generator=gen) * 3, torch.randn(6, 3, 64, generator=gen)
    k[2, 1] = 0.0  # an all-zero head: scale 0, values 0
    slots = torch.tensor([0, 17, 18, 100, 767, 5])
    for path in PATHS:
        kc = torch.zeros(48, 3, ref.kv_width(64), 16, dtype=torch.int8)
        vc = torch.zeros(48, 16, 3, ref.kv_width(64), dtype=torch.int8)
        with forced(path):
            kernels.kv_write(k, v, kc, vc, slots)
        for i, s in enumerate(slots.tolist()):
            stored_k, stored_v = kc[s // 16, :, :, s % 16], vc[s // 16, s % 16]
            assert torch.equal(stored_k, ref.quantize_kv(k[i])) and torch.equal(stored_v, ref.quantize_kv(v[i])), path
            for x, stored in ((k[i], stored_k), (v[i], stored_v)):
                # Half a step of the head's range / 255 (it has one group of 64), and the
                # float16 rounding of its parameters.
                step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255
                bound = step * 0.51 + x.abs().amax(-1, keepdim=True) * 2**-11
                assert ((ref.dequantize_kv(stored) - x).abs() <= bound).all(), path
        assert torch.equal(ref.dequantize_kv(kc[18 // 16, 1, :, 18 % 16]), torch.zeros(64))


@pytest.mark.parametrize("window,heads,d", [(0, (9, 3), 64), (37, (9, 3), 64), (0, (4, 1), 256), (0, (4, 2), 80)])
def test_int8_attention_paths_agree_bitwise_and_match_the_reference(window, heads, d):
    """Head sizes of one group (64), several (256, Gemma-3's) and a short last group (80)."""
    q, kc, vc, tables = int8_paged(22, heads=heads, d=d)
    q = q[: len(SEQ)]
    want = kernels.attention(q, kc, vc, tables, SEQ, POS, window, 0.125, path="reference").double()
    outs = [kernels.attention(q, kc, vc, tables, SEQ, POS, window, 0.125, path=p) for p in PATHS[1:]]
    for path, out in zip(PATHS[1:], outs):
        assert torch.equal(out, outs[0]), path
        assert torch.allclose(out.double(), want, atol=2e-6, rtol=2e-6), path  # float32 rounding only
        alone = torch.cat([kernels.attention(q[i : i + 1], kc, vc, tables, SEQ[i : i + 1], POS[i : i + 1], window,
                                             0.125, path=path) for i in range(len(SEQ))])
        assert torch.equal(alone, out), path


# ---- fused step kernels ---------------------------------------------------------------
def native_paths():
    return [p for p in PATHS if p != "reference"]


@contextlib.contextmanager
def forced(path: str):
    """Run the kernels' Python entry points on `path` for the block."""
    before = kernels._ISA
    kernels._ISA = path
    try:
        yield
    finally:
        kernels._ISA = before


def on_every_path(fn):
    """fn() on each compiled path (must agree bitwise) and on the reference: (compiled, reference)."""
    outs = []
    for path in native_paths():
        with forced(path):
            outs.append(fn())
    for path, out in zip(native_paths(), outs):
        for a, b in zip(out, outs[0]):
            assert torch.equal(a, b), path
    with forced("reference"):
        want = fn()
    return outs[0] if outs else want, want


@pytest.mark.parametrize("post", [False, True])
def test_residual_norm_matches_reference_and_updates_the_stream(post):
    gen = torch.Generator().manual_seed(8)
    x0, y = torch.randn(37, 640, generator=gen), torch.randn(37, 640, generator=gen)
    w, pw = torch.rand(640, generator=gen) + 0.5, torch.rand(640, generator=gen) + 0.5

    def run():
        x = x0.clone()
        return kernels.residual_norm(x, y, pw if post else None, w, 1e-6), x

    (out, x), (want, want_x) = on_every_path(run)
    assert torch.allclose(x, want_x, atol=1e-5) and torch.allclose(out, want, atol=1e-4, rtol=1e-4)
    alone = torch.cat([kernels.residual_norm(x0[i : i + 1].clone(), y[i : i + 1], pw if post else None, w, 1e-6)
                       for i in range(37)])
    assert torch.equal(alone, out)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activations_match_torch(act):
    gu = torch.randn(19, 2 * 1536, generator=torch.Generator().manual_seed(9)) * 4
    (out,), (want,) = on_every_path(lambda: (kernels.gated(gu, act),))
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)  # tanh via exp: a few ulps of the larger terms


def test_multi_part_linear_equals_one_gemm_per_part(bundled_tensors):
    w1, _ = bundled_tensors["smollm2/blk.3.attn_k.weight"]
    w2, _ = bundled_tensors["smollm2/blk.0.ffn_gate.weight"]
    x = activations(9, w1.in_features, seed=10)
    (y,), (want,) = on_every_path(lambda: (kernels.linear(x, [w1, w2]),))
    assert torch.equal(y, want)
    assert torch.equal(y, torch.cat([kernels.gemm(x, w1), kernels.gemm(x, w2)], dim=1))


@pytest.mark.parametrize("norms", [False, True])
def test_rope_attention_matches_reference(norms):
    _, kc0, vc0, tables = paged(11, torch.bfloat16, heads=(4, 2), d=64)
    _rope_attention_case(norms, kc0, vc0, tables)


def test_rope_attention_writes_int8_kv_as_the_reference():
    _, kc0, vc0, tables = int8_paged(11, heads=(4, 2), d=64)
    _rope_attention_case(True, kc0, vc0, tables)


def _rope_attention_case(norms, kc0, vc0, tables):
    gen = torch.Generator().manual_seed(12)
    t, h, hkv, d = len(SEQ), 4, 2, 64
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen)
    angles = torch.arange(256).float()[:, None] * torch.rand(d // 2, generator=gen)[None]
    cos, sin = torch.cat([angles.cos()] * 2, 1), torch.cat([angles.sin()] * 2, 1)
    qn = kn = None
    if norms:
        qn, kn = torch.rand(d, generator=gen) + 0.5, torch.rand(d, generator=gen) + 0.5

    def run():
        kc, vc = kc0.clone(), vc0.clone()
        return kernels.rope_attention(qkv, h, cos, sin, qn, kn, 1e-6, kc, vc, tables, SEQ, POS, 0, 0.125), kc, vc

    (out, kc, vc), (want, want_kc, want_vc) = on_every_path(run)
    assert torch.equal(vc, want_vc)
    if kc.dtype == torch.int8:  # K after fp32 RoPE, each way: about one quantization step apart
        got_k, ref_k = ref.dequantize_kv(kc.transpose(2, 3)), ref.dequantize_kv(want_kc.transpose(2, 3))
        step = (ref_k.amax(-1, keepdim=True) - ref_k.amin(-1, keepdim=True)) / 255
        assert ((got_k - ref_k).abs() <= step * 1.5).all()
    else:
        assert (kc.float() - want_kc.float()).abs().max() <= 2 ** -6  # bf16 K after fp32 RoPE
    assert torch.allclose(out, want, atol=2e-2, rtol=2e-2)  # queries vs keys rounded apart


@pytest.mark.parametrize("ggml_type", ref.FORMATS)
def test_embedding_rows_equal_the_dequantized_matrix(ggml_type):
    """A lookup on the blocks gives exactly the dequantized rows, on every path."""
    w = random_blocks(ggml_type, 50, 512, seed=13)
    ids = torch.tensor([0, 49, 17, 17, 31, 16, 15])
    want = ref.dequantize(w)[ids]
    (rows,), (reference_rows,) = on_every_path(lambda: (kernels.embedding(ids, w),))
    assert torch.equal(rows, want) and torch.equal(reference_rows, want)


def test_embedding_rejects_ids_out_of_range():
    if "reference" == PATHS[-1]:
        pytest.skip("needs the compiled kernels")
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.embedding(torch.tensor([50]), random_blocks(ref.Q8_0, 50, 64))


@pytest.mark.parametrize("ggml_type", ref.FORMATS)
def test_random_blocks_read_as_gguf_reads_them(ggml_type):
    """Every format's packing against the GGUF reader's own dequantization of the same bytes."""
    from tierlm.loader.gguf import dequantize as gguf_dequantize

    n, k = 21, 512
    gen = torch.Generator().manual_seed(14)
    size = {ref.Q4_K: 144, ref.Q6_K: 210}.get(ggml_type, ref.BLOCK_BYTES.get(ggml_type))
    nb = k // (256 if ggml_type in ref.SUPER else 32)
    raw = torch.randint(0, 256, (n, nb, size), dtype=torch.uint8, generator=gen)
    at = 208 if ggml_type == ref.Q6_K else 0
    raw[..., at:at + 2] = (torch.rand(n, nb, generator=gen) * 0.02 + 1e-3).half().view(torch.uint8).reshape(n, nb, 2)
    if ggml_type in (*ref.OFFSET, ref.Q4_K):
        raw[..., 2:4] = (-torch.rand(n, nb, generator=gen) * 0.1).half().view(torch.uint8).reshape(n, nb, 2)
    w = kernels.pack(raw.reshape(-1), ggml_type, n, k)
    assert torch.equal(ref.dequantize(w), gguf_dequantize(raw.reshape(-1).numpy(), ggml_type, (n, k)))
