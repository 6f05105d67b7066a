"""The batched LoRA kernel (csrc/lora.cpp): each row adds its own adapter's product, bit for
bit the PyTorch definition, whatever rows and adapters share its batch and on every ISA path
(rows grouped four to a work item or alone, weights shared or not)."""

from __future__ import annotations

import pytest
import torch

from tierlm import kernels

needs_ext = pytest.mark.skipif("avx2" not in kernels.supported() and "scalar" not in kernels.supported(),
                               reason="compiled kernels not built")


def _case(seed=0, t=37, k=72, sizes=(48, 16, 16), r=8, slots=3):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(t, k, generator=g)
    y = torch.randn(t, n, generator=g)
    a = torch.randn(slots, k, len(sizes) * r, generator=g) * 0.1  # A transposed
    b = torch.randn(slots, r, n, generator=g) * 0.1  # B transposed
    rows = torch.randint(-1, slots, (t,), generator=g, dtype=torch.int32)
    ends = torch.tensor(sizes).cumsum(0)
    active = torch.tensor([True] * (slots - 1) + [False])
    return x, y, rows, a, b, ends, active


def _merged(x, y, rows, a, b, ends, active):
    """What each row should get, by definition, in float64."""
    out = y.double().clone()
    r = b.shape[1]
    starts = [0] + ends.tolist()[:-1]
    for i in range(x.shape[0]):
        s = int(rows[i])
        if s < 0 or not active[s]:
            continue
        t = x[i].double() @ a[s].double()
        for p, (lo, hi) in enumerate(zip(starts, ends.tolist())):
            out[i, lo:hi] += t[p * r:(p + 1) * r] @ b[s, :, lo:hi].double()
    return out


def test_reference_adds_each_rows_own_adapter():
    x, y, rows, a, b, ends, active = _case()
    want = _merged(x, y, rows, a, b, ends, active)
    got = y.clone()
    kernels.lora_add(got, x, rows, a, b, ends, active, path="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    untouched = (rows < 0) | ~active[rows.clamp(min=0).long()]
    assert torch.equal(got[untouched], y[untouched])  # the base model's rows keep their bits


@needs_ext
@pytest.mark.parametrize("path", [p for p in kernels.supported() if p != "reference"])
def test_every_path_equals_the_reference_bit_for_bit(path):
    # blocks of 8 and 16 columns and outputs, and the one-by-one tails (odd ranks and sizes)
    for seed, k, r, sizes in ((0, 72, 8, (48, 16, 16)), (1, 576, 16, (96, 32, 32)), (2, 33, 5, (20, 7, 7)),
                              (3, 64, 24, (40,))):
        x, y, rows, a, b, ends, active = _case(seed, k=k, r=r, sizes=sizes)
        want, got = y.clone(), y.clone()
        kernels.lora_add(want, x, rows, a, b, ends, active, path="reference")
        kernels.lora_add(got, x, rows, a, b, ends, active, path=path)
        assert torch.equal(got, want), path


@needs_ext
def test_a_row_alone_equals_the_row_in_any_batch():
    x, y, rows, a, b, ends, active = _case(t=64)
    batch = y.clone()
    kernels.lora_add(batch, x, rows, a, b, ends, active)
    for i in (0, 7, 31, 63):
        alone = y[i:i + 1].clone()
        kernels.lora_add(alone, x[i:i + 1].contiguous(), rows[i:i + 1].contiguous(), a, b, ends, active)
        assert torch.equal(alone[0], batch[i])


@needs_ext
def test_bad_arguments_are_refused():
    x, y, rows, a, b, ends, active = _case()
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.lora_add(y.clone(), x, torch.full_like(rows, 5), a, b, ends, active)
    with pytest.raises(RuntimeError, match="P \\* R"):
        kernels.lora_add(y.clone(), x, rows, a, b, ends[:2], active)
