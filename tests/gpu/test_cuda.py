"""The CUDA path on a real NVIDIA GPU (skipped without one; benchmarks/gpu_check.sh runs
these with the GPU benchmark). Each check has a CPU-side counterpart in tests/unit and
tests/model; these cover what only a GPU runs: PyTorch's CUDA int4 kernel on GGUF codes,
the Triton kernel in bf16, weights and KV pool in GPU memory, CUDA graphs, the memory
profile, pinned warm-tier copies."""

from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.attention.paged import reference
from tierlm.layers.quant import CudaInt4Weight, Int4Weight, quantize_q4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_int4_kernel_on_gguf_codes():
    """The codes' affine map (scale, zero per 32) packed for tinygemm gives x W^T of the
    dequantized weight, as the CPU kernel's view of the same codes."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 576, generator=gen)
    q = quantize_q4(w)
    cuda = CudaInt4Weight(q, CUDA)
    want = Int4Weight.kernel_view(q)
    assert (cuda.dequantize().cpu() - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    x = torch.randn(5, 576, generator=gen).bfloat16()
    got = cuda.mm(x.to(CUDA)).float().cpu()
    ref = x.float() @ want.t()
    assert (got - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_triton_kernel_bf16_and_batch_invariant():
    from tierlm.attention import triton_paged

    gen = torch.Generator().manual_seed(1)
    k = torch.randn(40, 16, 3, 64, generator=gen).bfloat16().to(CUDA)
    v = torch.randn(40, 16, 3, 64, generator=gen).bfloat16().to(CUDA)
    tables = torch.arange(1, 37, dtype=torch.int32).view(3, 12).to(CUDA)
    seq = torch.tensor([0, 0, 1, 2, 2], dtype=torch.int32, device=CUDA)
    pos = torch.tensor([20, 150, 5, 0, 191], device=CUDA)
    q = torch.randn(5, 9, 64, generator=gen).bfloat16().to(CUDA)
    for window in (0, 32):
        got = triton_paged.attention(q, k, v, tables, seq, pos, window, 0.125)
        want = reference(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), seq.cpu(), pos.cpu(), window, 0.125)
        assert (got.float().cpu() - want.float()).abs().max().item() <= 2e-2
        for r in range(5):
            alone = triton_paged.attention(q[r:r + 1], k, v, tables[seq[r]:seq[r] + 1],
                                           torch.zeros(1, dtype=torch.int32, device=CUDA), pos[r:r + 1], window, 0.125)
            assert torch.equal(alone[0], got[r])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_checkpoints_on_cuda_match_transformers(arch, tiny_checkpoint):
    pytest.importorskip("transformers")
    from tests.model.test_hf_numerics import hf_greedy

    path, hf = tiny_checkpoint(arch)
    prompt = ids(80, 7)
    llm = LLM(str(path), device="cuda", dtype="float32", gpu_memory_utilization=0.3)
    assert llm.engine.runner.device.type == "cuda" and llm.engine.runner.attention.name == "paged"
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (llm.engine.prompt_logits(prompt) - ref).abs().max().item() <= 1e-3
    assert llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids == hf_greedy(hf, prompt, 32)


def test_graphs_equal_eager_and_runs_reproduce(tiny_checkpoint):
    """A tiny Llama with int4 weights (the CUDA int4 kernel) in bf16: a batch of five greedy
    requests gives the same tokens from CUDA graphs as eagerly, and the same logprob bits
    run to run."""
    pytest.importorskip("transformers")
    path = str(tiny_checkpoint("llama")[0])
    prompts = [{"prompt_token_ids": ids(n, n)} for n in (5, 40, 17, 90, 33)]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=1, ignore_eos=True)
    graphs = LLM(path, device="cuda", quantization="int4", gpu_memory_utilization=0.3, max_num_seqs=8)
    assert graphs.engine.runner.graphs is not None and graphs.engine.runner.graphs.sizes == (1, 2, 4, 8)
    assert graphs.engine.loaded.formats.get("int4", 0) > 0
    first = graphs.generate(prompts, params)
    again = graphs.generate(prompts, params)
    eager = LLM(path, device="cuda", quantization="int4", gpu_memory_utilization=0.3, max_num_seqs=8,
                enforce_eager=True)
    assert eager.engine.runner.graphs is None
    plain = eager.generate(prompts, params)
    for a, b, c in zip(first, again, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        assert [x.logprob for x in a.outputs[0].logprobs] == [x.logprob for x in b.outputs[0].logprobs]


def test_memory_share_bounds_the_pool(tiny_checkpoint):
    pytest.importorskip("transformers")
    total = torch.cuda.get_device_properties(CUDA).total_memory
    llm = LLM(str(tiny_checkpoint("qwen2")[0]), device="cuda", gpu_memory_utilization=0.25, enforce_eager=True)
    assert torch.cuda.memory_allocated(CUDA) <= 0.25 * total
    assert llm.engine.kv.pool.num_usable * 16 > 100_000  # tokens: the share, not --kv-cache-gb's 1 GiB default
    assert len(llm.generate({"prompt_token_ids": ids(9, 1)}, GREEDY)[0].outputs[0].token_ids) == 32


def test_warm_tier_copies_are_pinned_and_round_trip(tiny_checkpoint):
    pytest.importorskip("transformers")
    llm = LLM(str(tiny_checkpoint("gemma3")[0]), device="cuda", gpu_memory_utilization=0.2, enforce_eager=True)
    runner = llm.engine.runner
    llm.generate({"prompt_token_ids": ids(40, 2)}, SamplingParams(max_tokens=2))
    data = runner.read_block(1)
    assert data.device.type == "cpu" and data.is_pinned()
    runner.write_block(7, data)
    assert torch.equal(runner.read_block(7), data)
