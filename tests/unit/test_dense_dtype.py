"""Dense products in a dtype of their own: float32 GEMMs for a bf16 model where this CPU
multiplies float32 faster (runner/kernel_probe.py chooses, layers/linear.py runs)."""

from __future__ import annotations

import json

import pytest
import torch

from tierlm.config import ConfigError, EngineConfig
from tierlm.layers import quant
from tierlm.layers.linear import Linear
from tierlm.runner import kernel_probe


def _bf16_layer(gen: torch.Generator, n: int = 96, k: int = 160) -> Linear:
    layer = Linear(k, n, deterministic=True)
    layer.weight.data = torch.randn(n, k, generator=gen).bfloat16()
    layer.dense_dtype = torch.float32
    return layer


def test_float32_dense_products_of_a_bf16_layer():
    gen = torch.Generator().manual_seed(0)
    layer = _bf16_layer(gen)
    w = layer.weight.detach().float()
    x = torch.randn(300, 160, generator=gen).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32  # converted once, in place
    # float32 accumulation of bf16 inputs, rounded once: within one bf16 rounding of the exact sum
    ref = x.double() @ w.double().t()
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    alone = torch.cat([layer(x[i : i + 1]) for i in range(0, 300, 11)])
    for m in (2, 5, 64, 129, 300):  # batch-invariant on the float32 tiles
        assert torch.equal(layer(x[:m])[::11], alone[: len(range(0, m, 11))]), m


def test_shared_weight_keeps_its_dtype_for_the_embeddings():
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(96, 160, _weight=torch.randn(96, 160, generator=gen).bfloat16())
    emb.weight.requires_grad_(False)  # as the models hold it
    layer = Linear(160, 96, deterministic=True)
    layer.tie(emb.weight)
    layer.dense_dtype = torch.float32
    x = torch.randn(4, 160, generator=gen).bfloat16()
    y = layer(x)
    assert emb.weight.dtype == torch.bfloat16 and layer.weight is emb.weight
    assert layer.dense_weight() is emb.weight  # no second table: products in the table's dtype
    ref = (x.float() @ emb.weight.float().t()).bfloat16()
    assert (y.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-7


def test_quantized_layer_builds_its_dense_copy_in_the_dense_dtype():
    gen = torch.Generator().manual_seed(2)
    layer = Linear(128, 64, deterministic=True)
    q = quant.Int4Weight(quant.quantize_q4(torch.randn(64, 128, generator=gen)))
    layer.set_quantized(q)
    layer.dense_dtype = torch.float32
    x = torch.randn(6, 128, generator=gen).bfloat16()
    dense = layer(x, dense_rows=6)
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, q.dequantize())
    ref = x.double() @ q.dequantize().double().t()
    assert ((dense.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(layer(x, dense_rows=2)[2:], layer(x, dense_rows=0)[2:])  # decode rows: int4 kernel


def test_dense_dtype_choice_probed_once_and_remembered(tmp_path, monkeypatch):
    assert kernel_probe.dense_dtype("float32", torch.bfloat16, tmp_path) == torch.float32
    assert kernel_probe.dense_dtype("bfloat16", torch.bfloat16, tmp_path) == torch.bfloat16
    assert kernel_probe.dense_dtype("auto", torch.float32, tmp_path) == torch.float32
    assert not (tmp_path / "kernel_probes.json").exists()  # nothing needed measuring

    speed = {torch.float32: 1.0, torch.bfloat16: 6.0}  # seconds: an AVX2 CPU without bf16 units
    monkeypatch.setattr(kernel_probe, "_gemm_seconds", lambda dtype, act: speed[dtype])
    assert kernel_probe.dense_dtype("auto", torch.bfloat16, tmp_path) == torch.float32
    saved = json.loads((tmp_path / "kernel_probes.json").read_text())
    assert saved[f"dense|bfloat16|{kernel_probe.fingerprint()}"] == "float32"

    monkeypatch.setattr(kernel_probe, "_gemm_seconds", lambda *a: pytest.fail("re-measured despite a saved choice"))
    assert kernel_probe.dense_dtype("auto", torch.bfloat16, tmp_path) == torch.float32

    speed = {torch.float32: 6.0, torch.bfloat16: 1.0}  # AMX: bf16 wins, on a machine not seen before
    monkeypatch.setattr(kernel_probe, "_gemm_seconds", lambda dtype, act: speed[dtype])
    assert kernel_probe.dense_dtype("auto", torch.bfloat16, tmp_path / "other") == torch.bfloat16


def test_real_probe_picks_the_dtype_its_timings_favour(tmp_path, monkeypatch):
    """The real GEMM probe runs (recorded, not replaced) and the choice follows its two
    timings: whichever dtype measured faster is the one returned and remembered."""
    timed: dict[torch.dtype, float] = {}
    real = kernel_probe._gemm_seconds

    def recorded(dtype, act):
        timed[dtype] = real(dtype, act)
        return timed[dtype]

    monkeypatch.setattr(kernel_probe, "_gemm_seconds", recorded)
    chosen = kernel_probe.dense_dtype("auto", torch.bfloat16, tmp_path)
    assert set(timed) == {torch.float32, torch.bfloat16} and all(0 < t < 60 for t in timed.values())
    assert chosen == min(timed, key=lambda d: (timed[d], d != torch.bfloat16))
    saved = json.loads((tmp_path / "kernel_probes.json").read_text())
    assert saved[f"dense|bfloat16|{kernel_probe.fingerprint()}"] == str(chosen).removeprefix("torch.")


@pytest.mark.parametrize("kwargs,message", [
    ({"dense_dtype": "float16"}, "dense_dtype must be one of"),
    ({"dtype": "float32", "dense_dtype": "bfloat16"}, "dense_dtype bfloat16 needs dtype bfloat16"),
])
def test_bad_dense_dtype_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)
