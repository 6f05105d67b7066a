"""Linear layers and the batch-invariant GEMM they run on.

Owns the choice of GEMM kernel. BLAS picks its kernel and blocking from the matrix
shape, so a row's result can change with the number of rows it is batched with
(measured on this CPU: fp32 sgemm gives different bits for M=1, M=2 and M>=4; bf16
for M=1 vs M>=2 at K=1536). In deterministic mode every product therefore runs on row
tiles whose heights are known to give bitwise-identical rows for that (K, N, dtype):
a one-off probe per shape groups the candidate heights by their results and keeps the
largest group (on a tie, the one with the larger heights). Any split of a batch into
those heights then gives each row the same bits, while a one-row decode still gets a
small tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.layers.quant import QuantizedWeight

# Up to a prefill chunk: one AMX GEMM of 512 rows runs ~1.4x faster than eight of 64.
CANDIDATE_TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A different summation order changes a bf16 output only when the sum straddles a
# rounding boundary: about 1 element in 7,000 for K=1536. The probe compares ~2^18
# outputs per candidate so such a difference shows with overwhelming probability.
_PROBE_ELEMENTS = 1 << 18
_PROBE_PERIOD = 4096
# Tiles of a vocabulary-sized product stop at this many output elements (64 rows of a
# 262k vocabulary): taller ones save nothing there (few rows ask for logits) and probing
# them cost Gemma 3's output layer ~30 s of padded products at load.
MAX_TILE_ELEMENTS = 1 << 24


def _tiled(x: torch.Tensor, w_t: torch.Tensor, h: int) -> torch.Tensor:
    """x [M, K] @ w_t in tiles of exactly h rows (zero-padding the last)."""
    m = x.shape[0]
    padded = -(-m // h) * h
    if padded != m:
        x = torch.cat([x, x.new_zeros(padded - m, x.shape[1])])
    out = x.new_empty(padded, w_t.shape[1])
    for i in range(0, padded, h):
        torch.mm(x[i : i + h], w_t, out=out[i : i + h])
    return out[:m]


# (k, n, dtype name) -> probed tile heights; filled by probing or from a saved table.
PROBED: dict[tuple[int, int, str], tuple[int, ...]] = {}


def invariant_tiles(k: int, n: int, dtype: torch.dtype) -> tuple[int, ...]:
    key = (k, n, str(dtype).removeprefix("torch."))
    if key not in PROBED:
        PROBED[key] = probe_tiles(k, n, dtype)
    return PROBED[key]


def probe_tiles(k: int, n: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The largest set of tile heights (ascending) that give bitwise-equal rows for this
    shape (on a tie, the set with the larger heights: fewer, faster calls for long prompts).

    Kernel choice depends on shape and thread count, not on values, so equality on
    random data for every probed row means the same arithmetic order.
    """
    gen = torch.Generator().manual_seed(0)
    # Rows of W repeat every _PROBE_PERIOD outputs: cheap to build for a vocab-sized N,
    # and still thousands of distinct dot products per row.
    period = min(n, _PROBE_PERIOD)
    w_t = torch.randn(period, k, generator=gen).to(dtype).repeat(-(-n // period), 1)[:n].t()
    rows = min(512, max(8, -(-_PROBE_ELEMENTS // n)))
    x = torch.randn(rows, k, generator=gen).to(dtype)
    groups: list[tuple[torch.Tensor, list[int]]] = []
    for h in (h for h in CANDIDATE_TILES if h == 1 or h * n <= MAX_TILE_ELEMENTS):
        y = _tiled(x, w_t, h)
        match = next((heights for ref, heights in groups if torch.equal(y, ref)), None)
        if match is None:
            groups.append((y, [h]))
        else:
            match.append(h)
    return tuple(max((heights for _, heights in groups), key=lambda hs: (len(hs), hs[-1])))


def _rest_tiles(rest: int, heights: tuple[int, ...]) -> list[int]:
    """Tile heights (from `heights`) covering `rest` rows: pad up to the next height when that
    wastes at most an eighth of its rows, else take the largest height that fits and go on
    (a 40-row prompt runs as 32 + 8 rows, not as 64 with 24 of zeros)."""
    tiles = []
    while rest > 0:
        up = next((h for h in heights if h >= rest), None)
        if up is not None and (up - rest <= up // 8 or rest < heights[0]):
            tiles.append(up)
            break
        down = max(h for h in heights if h <= rest)
        tiles.append(down)
        rest -= down
    return tiles


def invariant_mm(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w_t [K, N] with each row's bits independent of M (batch-invariant): every
    tile height used gives a row the same bits (invariant_tiles), so any split of the rows
    into those heights does."""
    heights = invariant_tiles(w_t.shape[0], w_t.shape[1], x.dtype)
    big = heights[-1]
    m = x.shape[0]
    full = m - m % big
    parts = [_tiled(x[:full], w_t, big)] if full else []
    start = full
    for h in _rest_tiles(m - full, heights):
        take = min(h, m - start)
        parts.append(_tiled(x[start:start + take], w_t, h))
        start += take
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else x.new_empty(0, w_t.shape[1])


# Below this many rows a quantized weight's own kernel beats a bf16 GEMM (measured on
# AVX-512/AMX: int4 wins up to ~8-16 rows, bf16 from ~32); used when rows are not
# assigned a format by role (non-deterministic mode).
DENSE_MIN_ROWS = 16


class Linear(nn.Module):
    """y = x W^T (+ b) over a flat [tokens, in] activation.

    The weight is a plain [out, in] parameter so loaders can fill it directly;
    `deterministic` selects the batch-invariant tiled kernel. A layer may also hold a
    quantized copy (`set_quantized`, layers/quant.py): its rows then run in one of two
    formats, the quantized kernel (decode) or a dense copy (prefill: the weight as the
    kernel sees it, given by the loader or built from it on first use). `dense_rows` says
    which: the first `dense_rows` rows use the dense copy and the rest the quantized
    kernel (the caller orders rows so that a token's format follows from its role, never
    from its batch), or None to choose by the number of rows (faster, batch-variant).

    `dense_dtype` is the dtype dense products run in (None, or a weight shared with the
    embeddings: the weight's own). A CPU without bf16 matrix units multiplies float32
    several times faster than bf16 (runner/kernel_probe.py measures which), so a bf16
    model may run its dense GEMMs on float32 weights: activations are widened exactly
    and the result rounded back.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 deterministic: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.deterministic = deterministic
        self.quantized: QuantizedWeight | None = None
        self.dense_dtype: torch.dtype | None = None
        # The weight is the embedding table's too: its dense products stay in the table's
        # dtype (a converted copy would cost a second vocabulary-sized table, ~0.11 GB for
        # SmolLM2 in float32, for the few rows a prefill asks logits of).
        self.shares_weight = False
        # Adapter slots over this projection (lora/slots.py), when LoRA is enabled: each
        # row adds its own adapter's product after the base product.
        self.lora = None

    def tie(self, weight: nn.Parameter) -> None:
        """Use `weight` (the embedding table) as this layer's weight."""
        self.weight = weight
        self.shares_weight = True

    def set_quantized(self, q: QuantizedWeight, dense: torch.Tensor | None = None) -> None:
        """Hold `q` for decode rows, and `dense` (its weight as the kernel sees it) as the
        dense copy for prompt rows. Without `dense` an own dense weight is dropped and built
        from `q` on first use; a shared one stays for the embeddings."""
        self.quantized = q
        if dense is not None and not self.shares_weight:
            self.weight = nn.Parameter(dense.to(self.dense_dtype or torch.bfloat16), requires_grad=False)
        elif not self.shares_weight:
            self.weight = nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        """The weight in the dtype dense products run in; built or converted once, lazily."""
        w = self.weight
        if w.numel() == 0 and self.quantized is not None:
            w.data = self.quantized.dequantize().to(self.dense_dtype or torch.bfloat16)
            return w
        if self.dense_dtype not in (None, w.dtype) and not self.shares_weight:
            w.data = w.data.to(self.dense_dtype)
        return w

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight()
        xw = x.to(w.dtype)
        y = invariant_mm(xw, w.t()) if self.deterministic else F.linear(xw, w)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        y = self._base(x, dense_rows)
        return y if self.lora is None else self.lora.apply(x, y)

    def _base(self, x: torch.Tensor, dense_rows: int | None) -> torch.Tensor:
        q = self.quantized
        if q is None and not self.deterministic and self.dense_weight().dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        if q is None:
            y = self._dense(x)
        elif getattr(q, "bits", None) == 0:  # GGUF blocks: one batch-invariant kernel for every row
            y = q.mm(x)
        else:
            m = x.shape[0]
            dense = (m if m >= DENSE_MIN_ROWS else 0) if dense_rows is None else min(dense_rows, m)
            if dense == m:
                y = self._dense(x)
            elif dense == 0:
                y = q.mm(x)
            else:
                y = torch.cat([self._dense(x[:dense]), q.mm(x[dense:])])
        if self.bias is not None:
            y = y + self.bias
        return y


def rows_by_format(layer: Linear, x: torch.Tensor, dense: torch.Tensor, dense_rows: int | None) -> torch.Tensor:
    """`layer` over rows of `x` in any order, `dense` marking those that take the dense
    format: they go first, and the results come back in x's order."""
    if not dense_rows or layer.quantized is None:  # no dense rows: no count (a host sync on a GPU)
        return layer(x, dense_rows)
    n = int(dense.sum())
    if n in (0, x.shape[0]):
        return layer(x, n)
    order = torch.argsort(~dense, stable=True)
    y = layer(x[order], n)
    out = torch.empty_like(y)
    out[order] = y
    return out
