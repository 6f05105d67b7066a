"""Batch-invariant GEMM: a row's bits never depend on how many rows share the call."""

from __future__ import annotations

import json

import pytest
import torch

from tierlm.layers import linear
from tierlm.layers.activation import GATED_ACTIVATIONS
from tierlm.layers.linear import Linear, invariant_mm
from tierlm.runner import kernel_probe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 320)])
def test_rows_identical_for_any_batch_size(dtype, k, n):
    g = torch.Generator().manual_seed(3)
    w_t = torch.randn(n, k, generator=g).to(dtype).t()
    x = torch.randn(1100, k, generator=g).to(dtype)
    alone = torch.cat([invariant_mm(x[i : i + 1], w_t) for i in range(0, 1100, 7)])
    for m in (2, 3, 5, 17, 64, 65, 130, 300, 512, 1100):
        got = invariant_mm(x[:m], w_t)
        rows = list(range(0, m, 7))
        assert torch.equal(got[rows], alone[: len(rows)]), (m, dtype, k, n)


def test_empty_batch():
    w_t = torch.randn(8, 16).t()
    assert invariant_mm(torch.empty(0, 16), w_t).shape == (0, 8)


def test_probe_table_saved_reused_and_damage_ignored(tmp_path, monkeypatch):
    model = torch.nn.Sequential(Linear(48, 40), Linear(40, 24))
    real_probe = linear.probe_tiles
    monkeypatch.setattr(linear, "PROBED", {})
    kernel_probe.ensure_probed(model, tmp_path)
    saved = json.loads((tmp_path / "kernel_probes.json").read_text())
    table = saved[kernel_probe.fingerprint()]
    assert set(table) == {"48,40,float32", "40,24,float32"} and all(64 in h for h in table.values())

    monkeypatch.setattr(linear, "PROBED", {})
    monkeypatch.setattr(linear, "probe_tiles", lambda *a: pytest.fail("re-probed despite a saved table"))
    kernel_probe.ensure_probed(model, tmp_path)
    assert linear.PROBED[(48, 40, "float32")] == tuple(table["48,40,float32"])

    (tmp_path / "kernel_probes.json").write_text("{not json")  # damaged: re-probed, not trusted
    monkeypatch.setattr(linear, "PROBED", {})
    monkeypatch.setattr(linear, "probe_tiles", real_probe)
    kernel_probe.ensure_probed(model, tmp_path)
    assert (48, 40, "float32") in linear.PROBED


@pytest.mark.parametrize("act", sorted(GATED_ACTIVATIONS))
@pytest.mark.parametrize("width", [160, 1536, 20000])
def test_gated_activations_are_batch_invariant(act, width):
    """Elementwise kernels split big tensors across threads by size, and the elements at
    a split take a scalar path with different last bits: rows must not notice."""
    fn = GATED_ACTIVATIONS[act]
    x = torch.randn(260 if width < 10000 else 6, 2 * width, generator=torch.Generator().manual_seed(width))
    alone = torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])
    for tokens in range(1, x.shape[0] + 1):
        assert torch.equal(fn(x[:tokens]), alone[:tokens]), tokens
