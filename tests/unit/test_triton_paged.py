"""The Triton paged-attention kernel (attention/triton_paged.py) run by Triton's CPU
interpreter against the PyTorch reference (attention/paged.py `reference`).

The interpreter executes the kernel's program logic (block walk, masks, online softmax,
strides) with numpy; it cannot run bf16 dot products, so float32 and float16 are checked
here and bf16 on a GPU (tests/gpu). It must be switched on before the kernel is defined:
each check runs in a fresh interpreter process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from tierlm.attention import triton_paged
    from tierlm.attention.paged import reference

    gen = torch.Generator().manual_seed(0)
    worst = {}
    for dtype, group, head_dim in ((torch.float32, 3, 64), (torch.float16, 1, 32), (torch.float32, 4, 24)):
        kv_heads, block, blocks = 2, 16, 14
        k = torch.randn(blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
        tables = torch.tensor([[3, 5, 7, 0], [1, 2, 0, 0], [9, 10, 11, 4]], dtype=torch.int32)
        seq = torch.tensor([0, 0, 1, 2, 2, 2], dtype=torch.int32)
        pos = torch.tensor([20, 40, 5, 0, 33, 63])
        q = torch.randn(6, kv_heads * group, head_dim, generator=gen).to(dtype)
        for window in (0, 8):
            got = triton_paged.attention(q, k, v, tables, seq, pos, window, 0.17)
            want = reference(q, k, v, tables, seq, pos, window, 0.17)
            worst[(str(dtype), group, window)] = (got.float() - want.float()).abs().max().item()
            # Batch invariance: each row alone gives the bits it gets in the batch.
            for r in (0, 4):
                alone = triton_paged.attention(q[r:r + 1], k, v, tables[seq[r]:seq[r] + 1],
                                               torch.zeros(1, dtype=torch.int32), pos[r:r + 1], window, 0.17)
                assert torch.equal(alone[0], got[r]), (dtype, window, r)
    print(worst)
    for (dtype, group, window), err in worst.items():
        assert err <= (2e-3 if "float16" in dtype else 2e-6), (dtype, group, window, err)
    print("ok")
""")


def test_kernel_matches_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@pytest.mark.parametrize("capability", [80, 90])  # A100, H100
def test_kernel_compiles_for_nvidia_gpus(capability):
    """Ahead of time, without a GPU: Triton lowers the kernel to PTX and ptxas (shipped with
    Triton) assembles it for the target, for each KV dtype and the bundled models' head shapes
    (SmolLM2: 3 query heads per KV head of 64; Gemma-3-270M: 4 of 256)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tierlm.attention import triton_paged

    pointers = ("q_ptr", "k_ptr", "v_ptr", "out_ptr")
    strides = ("stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh",
               "stride_tb", "stride_ot", "stride_oh")
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        for group, dim in ((3, 64), (4, 256)):
            consts = {"GROUP": group, "GROUP_PAD": 16, "HEAD_DIM": dim, "DIM_PAD": dim, "BLOCK": 16,
                      "PRECISION": precision}
            signature = {**{p: f"*{dtype}" for p in pointers}, "tables_ptr": "*i32", "seq_ptr": "*i32",
                         "pos_ptr": "*i64", "scale": "fp32", "window": "i32", **dict.fromkeys(strides, "i32"),
                         **dict.fromkeys(consts, "constexpr")}
            source = ASTSource(fn=triton_paged._paged_attention, signature=signature, constexprs=consts)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
            assert compiled.asm["cubin"] and ".entry _paged_attention" in compiled.asm["ptx"]
