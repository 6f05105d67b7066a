"""PyTorch definitions of the compiled kernels' numerics: the oracle the C++ paths must
equal bit for bit (tests), and the fallback when the extension is not built.

Activations: per 32-value block, d = amax / 127, q = round-half-even(x * (1 / d)) as int8,
s = d * sum(q) and the exact sum(q) (int32).

Weights: GGUF blocks repacked at load (`pack`) with 16 output rows interleaved, so that one
32-bit SIMD lane holds one output row: per group of 16 rows and block, Q4_1 codes as 4
chunks of [row 0 bytes 4c..4c+3, row 1 bytes 4c..4c+3, ... row 15] (byte i holds value i
in its low nibble and value 16 + i in its high one), Q8_0 codes as 8 chunks of [row r
values 4c..4c+3 for r in 0..15]; the 16 rows' f16 scales (and Q4_1 offsets) side by side.
Q4_0 is Q4_1's layout without offsets, its codes the nibbles minus 8. Q5_0 and Q5_1 keep
their low 4 bits as Q4_1's nibbles and their fifth bits in a 64-byte plane per block:
byte (row r, t) holds, at bit 2c, value 4c+t's and at bit 2c+1, value 16+4c+t's; Q5_0's
codes are the 5-bit values minus 16, Q5_1's the values (with Q4_1's offset term). Q4_K's 32-value sub-blocks are re-nibbled into
Q4_1's layout; its f16 d and dmin stay per 256 values ([Np / 16, nb / 8, 16]) and its
6-bit sub-block scale and min per block (`sub`: [Np / 16, nb, 32], 16 scales then 16 mins),
so a block's scale d * sc and offset dmin * m are exact fp32 products; its term is
acc = (acc + (dw * dx) * isum) - (dmin * m) * s.
Q6_K keeps its low 4 bits as nibbles and its top 2 bits in two 64-byte planes per block
(plane p, byte (row r, t): bits 4j..4j+1 value 4c+t's, 4j+2..4j+3 value 16+4c+t's, for
c = 2p + j); codes are the 6-bit values minus 32. Its int8 scale per 16 values times the
super-block's d is exact in fp32 (`sub`: 16 scales of values 0-15, then 16 of 16-31), and
a block adds its halves in order: acc = (acc + (d * sc0 * dx) * isum0) + (d * sc1 * dx) * isum1.
A 512-bit vector takes a whole chunk, a 256-bit one half (rows 0-7 or 8-15). Rows are
padded to a multiple of 16 with zero rows.

Output y[m, n], over the blocks b in order, each fp32 multiply and add rounded on its own:
    isum = sum_i qw[n, b, i] * qx[m, b, i]                        (exact int32)
    acc  = (acc + (dw[n, b] * dx[m, b]) * isum) [+ mw[n, b] * s[m, b]]   from acc = 0
so a row's result depends on nothing but that row: not the batch, the tiling, the threads
or the ISA path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

QK = 32
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = 2, 3, 6, 7, 8, 12, 14  # ggml type ids
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34}  # per 32 values (Q4_K: 144 per 256)
CODE_BYTES = {Q4_0: 16, Q4_1: 16, Q5_0: 16, Q5_1: 16, Q8_0: 32, Q4_K: 16, Q6_K: 16}  # nibbles or int8
FORMATS = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)
OFFSET = (Q4_1, Q5_1)  # blocks with an offset m: value d * q + m
FIFTH = {Q5_0: 2, Q5_1: 4}  # where a block's 32 fifth bits sit
SUPER = (Q4_K, Q6_K)  # 256-value super-blocks
R = 16  # interleaved rows


@dataclass(frozen=True)
class Packed:
    """One weight matrix in the kernels' layout (see the module docstring)."""

    ggml_type: int
    out_features: int
    in_features: int
    qs: torch.Tensor  # uint8 [Np / 16, nb, 16 * (16 | 32)]
    d: torch.Tensor  # float16 [Np / 16, nb, 16]
    mins: torch.Tensor  # float16 [Np / 16, nb, 16]: Q4_1's offsets, Q4_K's dmin per 256 (else zeros)
    high: torch.Tensor  # uint8 [Np / 16, nb, 64]: Q5_0's fifth bits (empty for the others)
    sub: torch.Tensor  # uint8 [Np / 16, nb, 32]: Q4_K's 6-bit scales and mins, Q6_K's int8 scales
    # (Q6_K: `high` is [Np / 16, nb, 128], its two planes of top bits)

    @property
    def blocks(self) -> int:
        return self.in_features // QK

    def nbytes(self) -> int:
        """Bytes a product reads (codes, scales, Q4_1 offsets)."""
        return (self.qs.numel() + self.high.numel() + self.sub.numel() + 2 * self.d.numel()
                + (2 * self.mins.numel() if self.ggml_type in (*OFFSET, Q4_K) else 0))


def pack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> Packed:
    """GGUF blocks (uint8, n rows of k values) -> the kernels' layout."""
    if ggml_type not in FORMATS:
        raise ValueError(f"no kernel for ggml type {ggml_type}")
    if k % (256 if ggml_type in SUPER else QK):
        raise ValueError(f"rows of {k} values are not whole blocks")
    if ggml_type == Q4_K:
        return _pack_q4_k(raw, n, k)
    if ggml_type == Q6_K:
        return _pack_q6_k(raw, n, k)
    nb, np_ = k // QK, -(-n // R) * R
    b = raw.reshape(n, nb, BLOCK_BYTES[ggml_type])
    if np_ != n:  # whole groups of 16 rows (a copy only when padding is needed)
        b = torch.nn.functional.pad(b, (0, 0, 0, 0, 0, np_ - n))
    codes = b[..., BLOCK_BYTES[ggml_type] - CODE_BYTES[ggml_type]:]  # [Np, nb, 16 | 32]
    chunks = CODE_BYTES[ggml_type] // 4
    # [Np/16, 16 rows, nb, chunks, 4] -> [Np/16, nb, chunks, 16 rows, 4]
    qs = codes.reshape(np_ // R, R, nb, chunks, 4).permute(0, 2, 3, 1, 4).reshape(np_ // R, nb, -1)
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]
    mins = b[..., 2:4].contiguous().view(torch.float16)[..., 0] if ggml_type in OFFSET else torch.zeros_like(d)
    if not (torch.isfinite(d).all() and torch.isfinite(mins).all()):
        raise ValueError("the tensor's block scales are not all finite")

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [Np, nb] -> [Np/16, nb, 16]
        return t.reshape(np_ // R, R, nb).transpose(1, 2).contiguous()

    high = torch.empty(0, dtype=torch.uint8)
    if ggml_type in FIFTH:
        at = FIFTH[ggml_type]
        qh = b[..., at:at + 4].to(torch.int64)
        bits = (qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24)[..., None] >> torch.arange(32) & 1
        c = torch.arange(4)
        plane = torch.stack([((bits[..., 4 * c + t] << 2 * c) | (bits[..., 16 + 4 * c + t] << 2 * c + 1)).sum(-1)
                             for t in range(4)], dim=-1)  # [Np, nb, 4]
        high = plane.reshape(np_ // R, R, nb, 4).transpose(1, 2).reshape(np_ // R, nb, 64).to(torch.uint8)
    return Packed(ggml_type, n, k, qs.contiguous(), by_group(d), by_group(mins), high.contiguous(),
                  torch.empty(0, dtype=torch.uint8))


def _interleave(t: torch.Tensor, np_: int) -> torch.Tensor:
    """[Np, nb, 4 * chunks] row-major codes -> [Np/16, nb, chunks * 16 rows * 4]."""
    nb, width = t.shape[1], t.shape[2]
    return t.reshape(np_ // R, R, nb, width // 4, 4).permute(0, 2, 3, 1, 4).reshape(np_ // R, nb, -1)


def _pack_q4_k(raw: torch.Tensor, n: int, k: int) -> Packed:
    from tierlm.layers.quant import _k_scales

    nsb, np_ = k // 256, -(-n // R) * R
    b = torch.nn.functional.pad(raw.reshape(n, nsb, 144), (0, 0, 0, 0, 0, np_ - n))
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [Np, nsb]
    dmin = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
    if not (torch.isfinite(d).all() and torch.isfinite(dmin).all()):
        raise ValueError("the tensor's block scales are not all finite")
    sc, mn = _k_scales(b[..., 4:16].reshape(-1, 12))  # [Np * nsb, 8] each
    qs = b[..., 16:].reshape(np_, nsb, 4, 32)  # 4 runs of 32 bytes: sub-blocks 2j (low) and 2j+1 (high)
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(np_, nsb * 8, 32)  # value order per sub-block
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # Q4_1's layout

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [Np, x] -> [Np/16, x, 16]
        return t.reshape(np_ // R, R, -1).transpose(1, 2).contiguous()

    sub = torch.cat([by_group(sc.reshape(np_, nsb * 8).to(torch.uint8)),
                     by_group(mn.reshape(np_, nsb * 8).to(torch.uint8))], dim=-1)
    return Packed(Q4_K, n, k, _interleave(nibbles, np_).contiguous(), by_group(d), by_group(dmin),
                  torch.empty(0, dtype=torch.uint8), sub.contiguous())


def _pack_q6_k(raw: torch.Tensor, n: int, k: int) -> Packed:
    nsb, np_ = k // 256, -(-n // R) * R
    b = torch.nn.functional.pad(raw.reshape(n, nsb, 210), (0, 0, 0, 0, 0, np_ - n))
    ql, qh = b[..., :128].to(torch.int32), b[..., 128:192].to(torch.int32)
    scales = b[..., 192:208].contiguous().view(torch.int8)  # [Np, nsb, 16], one per 16 values
    d = b[..., 208:210].contiguous().view(torch.float16)[..., 0]
    if not torch.isfinite(d).all():
        raise ValueError("the tensor's block scales are not all finite")
    halves = []
    for h in range(2):  # ggml's order: 128 values from 64 bytes of ql and 32 of qh
        lq, hq = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        halves += [(lq[..., :32] & 15) | ((hq & 3) << 4), (lq[..., 32:] & 15) | (((hq >> 2) & 3) << 4),
                   (lq[..., :32] >> 4) | (((hq >> 4) & 3) << 4), (lq[..., 32:] >> 4) | (((hq >> 6) & 3) << 4)]
    codes = torch.cat(halves, dim=-1).reshape(np_, nsb * 8, 32)  # 0..63, value order
    low, top = codes & 15, codes >> 4
    nibbles = (low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8)
    planes = []
    for p in range(2):
        js = torch.arange(2)
        byte = sum(((top[..., 4 * (2 * p + j) + torch.arange(4)] << 4 * j)
                    | (top[..., 16 + 4 * (2 * p + j) + torch.arange(4)] << 4 * j + 2)) for j in js)
        planes.append(byte)  # [Np, nb, 4]

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [Np, x] -> [Np/16, x, 16]
        return t.reshape(np_ // R, R, -1).transpose(1, 2).contiguous()

    def plane_layout(t: torch.Tensor) -> torch.Tensor:  # [Np, nb, 4] -> [Np/16, nb, 64]
        return t.reshape(np_ // R, R, nsb * 8, 4).transpose(1, 2).reshape(np_ // R, nsb * 8, 64)

    high = torch.cat([plane_layout(pl) for pl in planes], dim=-1).to(torch.uint8)
    sc = scales.reshape(np_, nsb * 8, 2)  # per block: values 0-15, 16-31
    sub = torch.cat([by_group(sc[..., 0].view(torch.uint8)), by_group(sc[..., 1].view(torch.uint8))], dim=-1)
    return Packed(Q6_K, n, k, _interleave(nibbles, np_).contiguous(), by_group(d), torch.zeros_like(by_group(d)),
                  high.contiguous(), sub.contiguous())


def codes(w: Packed) -> torch.Tensor:
    """The weight codes as int32 [N, nb, 32] in value order."""
    groups, nb = w.qs.shape[:2]
    chunks = CODE_BYTES[w.ggml_type] // 4
    raw = w.qs.reshape(groups, nb, chunks, R, 4).permute(0, 3, 1, 2, 4).reshape(groups * R, nb, chunks * 4)
    if w.ggml_type != Q8_0:
        raw = raw.to(torch.int32)
        full = torch.cat([raw & 0x0F, raw >> 4], dim=-1)
    else:
        full = raw.view(torch.int8).to(torch.int32)
    if w.ggml_type == Q4_0:
        full = full - 8
    if w.ggml_type in FIFTH:  # the fifth bits, back in value order (Q5_0: and the offset of 16)
        plane = w.high.reshape(groups, nb, R, 4).permute(0, 2, 1, 3).reshape(groups * R, nb, 4).to(torch.int32)
        c = torch.arange(4)
        low = (plane[..., None, :] >> (2 * c)[:, None] & 1).reshape(groups * R, nb, 16)  # value 4c + t
        up = (plane[..., None, :] >> (2 * c + 1)[:, None] & 1).reshape(groups * R, nb, 16)  # value 16 + 4c + t
        full = full + 16 * torch.cat([low, up], dim=-1) - (16 if w.ggml_type == Q5_0 else 0)
    if w.ggml_type == Q6_K:  # the top two bits, back in value order, and the offset of 32
        planes = w.high.reshape(groups, nb, 2, R, 4).permute(0, 3, 1, 2, 4).reshape(groups * R, nb, 2, 4)
        planes = planes.to(torch.int32)
        top = torch.zeros(groups * R, nb, 32, dtype=torch.int32)
        for p in range(2):
            for j in range(2):
                c = 2 * p + j
                top[..., 4 * c:4 * c + 4] = (planes[..., p, :] >> 4 * j) & 3
                top[..., 16 + 4 * c:20 + 4 * c] = (planes[..., p, :] >> 4 * j + 2) & 3
        full = full + 16 * top - 32
    return full[: w.out_features]


def scales(w: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per block as float32 [N, nb]: y gains (scale * dx) * isum + offset * s.
    Q4_K's are the exact products d * sc and -(dmin * m)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(w.qs.shape[0] * R, -1)[: w.out_features].float()

    if w.ggml_type == Q6_K:  # per 16 values: [N, nb, 2]
        d = rows(w.d).repeat_interleave(8, dim=1)
        halves = [rows(w.sub[..., R * i:R * (i + 1)].view(torch.int8)) for i in range(2)]
        return torch.stack([d * halves[0], d * halves[1]], dim=-1), torch.zeros_like(d)
    if w.ggml_type != Q4_K:
        return rows(w.d), rows(w.mins)
    sc, mn = rows(w.sub[..., :R]), rows(w.sub[..., R:])
    d, dmin = (rows(t).repeat_interleave(8, dim=1) for t in (w.d, w.mins))
    return d * sc, -(dmin * mn)


def dequantize(w: Packed) -> torch.Tensor:
    """fp32 weights [N, K] (Q4_1: d * q + m; Q8_0: d * q)."""
    d, mins = scales(w)
    if w.ggml_type == Q6_K:
        d = d.repeat_interleave(16, dim=-1).reshape(*d.shape[:2], 32)
        return (codes(w).float() * d).reshape(w.out_features, w.in_features)
    return (codes(w).float() * d[..., None] + mins[..., None]).reshape(w.out_features, w.in_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[M, K] -> (int8 codes [M, K], block scales [M, K/32], d * sum(q) [M, K/32],
    sum(q) int32 [M, K/32], sums of each 16 codes int32 [M, K/16])."""
    m, k = x.shape
    xb = x.float().reshape(m, k // QK, QK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None])  # round half to even, as nearbyint
    total = q.sum(-1)
    halves = q.reshape(m, k // 16, 16).sum(-1).to(torch.int32)
    return q.to(torch.int8).reshape(m, k), d, d * total, total.to(torch.int32), halves


def gemm(qx: torch.Tensor, dx: torch.Tensor, sx: torch.Tensor, w: Packed) -> torch.Tensor:
    """Quantized activations x packed weights -> fp32 [M, N], the kernels' numerics."""
    m, nb = dx.shape
    xq = qx.reshape(m, nb, QK).float()
    # Per block: exact integer sums (every partial is an integer below 2^24, so fp32 is exact).
    dw, mw = scales(w)
    acc = torch.zeros(m, w.out_features)
    if w.ggml_type == Q6_K:  # two halves of 16 values per block, each with its own scale
        isum = torch.einsum("mbhi,nbhi->mnbh", xq.reshape(m, nb, 2, 16), codes(w).float().reshape(-1, nb, 2, 16))
        for b in range(nb):
            acc = acc + (dw[None, :, b, 0] * dx[:, None, b]) * isum[:, :, b, 0]
            acc = acc + (dw[None, :, b, 1] * dx[:, None, b]) * isum[:, :, b, 1]
        return acc
    isum = torch.einsum("mbi,nbi->mnb", xq, codes(w).float())
    for b in range(nb):
        acc = acc + (dw[None, :, b] * dx[:, None, b]) * isum[:, :, b]
        if w.ggml_type in OFFSET:
            acc = acc + mw[None, :, b] * sx[:, None, b]
        elif w.ggml_type == Q4_K:  # acc - (dmin * m) * s: the same bits as adding the negated product
            acc = acc - (-mw[None, :, b]) * sx[:, None, b]
    return acc


SCALE_BYTES = 4  # an int8 cache's (scale, min) float16 pair per group of a head, after its codes
KV_GROUP = 64  # dimensions sharing one (scale, min)
_HALF_MAX = 65504.0


def kv_width(head_dim: int) -> int:
    """Elements of one token's head in an int8 cache: codes, then 4 bytes per group."""
    return head_dim + SCALE_BYTES * -(-head_dim // KV_GROUP)


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> int8 [..., kv_width(D)] (csrc/attention.cpp has the rule): per group of 64
    dimensions, m = f16(min), s = f16((max - m) / 255), codes round-half-even((x - m) / s) in
    [0, 255] (uint8 bits; 0 where s is 0); the codes, then each group's s and m as
    little-endian halves."""
    codes, params = [], []
    for g in x.float().split(KV_GROUP, dim=-1):
        lo = g.amin(-1, keepdim=True).clamp(-_HALF_MAX, _HALF_MAX)
        hi = g.amax(-1, keepdim=True).clamp(-_HALF_MAX, _HALF_MAX)
        m = lo.half().float()
        s = ((hi - m) / 255).clamp(0, _HALF_MAX).half().float()
        codes.append(torch.where(s > 0, torch.round((g - m) / s), torch.zeros_like(g)).clamp(0, 255).to(torch.uint8))
        params.append(torch.cat([s.half(), m.half()], dim=-1).view(torch.uint8))
    return torch.cat([*codes, *params], dim=-1).view(torch.int8)


def dequantize_kv(stored: torch.Tensor) -> torch.Tensor:
    """int8 [..., kv_width(D)] -> float32 [..., D]: codes * s + m, each group's own parameters."""
    u = stored.view(torch.uint8)
    groups = u.shape[-1] // (KV_GROUP + SCALE_BYTES) + (u.shape[-1] % (KV_GROUP + SCALE_BYTES) > 0)
    d = u.shape[-1] - SCALE_BYTES * groups
    p = u[..., d:].contiguous().view(torch.float16).float()  # [..., 2 * groups]: s, m per group
    values = [c.float() * p[..., 2 * i:2 * i + 1] + p[..., 2 * i + 1:2 * i + 2]
              for i, c in enumerate(u[..., :d].split(KV_GROUP, dim=-1))]
    return torch.cat(values, dim=-1)


def _kv_values(x: torch.Tensor) -> torch.Tensor:
    """Cache rows [..., width] as float64 values [..., D] (int8 rows dequantized first)."""
    return (dequantize_kv(x) if x.dtype == torch.int8 else x).double()


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              seq: torch.Tensor, pos: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """The kernels' paged attention (csrc/attention.cpp) in float64, row by row: the oracle
    its results match to float32 rounding. K [blocks, kv_heads, D, block_size], V [blocks,
    block_size, kv_heads, D] (int8: kv_width(D), codes and their parameters); returns [T, H * D]
    in q's dtype."""
    t, h, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[3]
    out = torch.empty(t, h, d, dtype=torch.float64)
    for i in range(t):
        p = int(pos[i])
        lo = max(0, p - window + 1) if window > 0 else 0
        keys = torch.arange(lo, p + 1)
        blocks = tables[int(seq[i])].long()[keys // bs]
        k = _kv_values(k_cache[blocks, :, :, keys % bs])  # [n, kv_heads, D]
        v = _kv_values(v_cache[blocks, keys % bs])
        for head in range(h):
            kv = head // (h // hkv)
            w = torch.softmax((k[:, kv] @ q[i, head].double()) * scale, dim=0)
            out[i, head] = w @ v[:, kv]
    return out.reshape(t, h * d).to(q.dtype)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [T, kv_heads, D] into the caches at flat slots (K transposed per block; an int8
    cache gets each head's codes and their parameters, `quantize_kv`)."""
    bs = k_cache.shape[3]
    blocks, offsets = slots // bs, slots % bs
    if k_cache.dtype == torch.int8:
        k, v = quantize_kv(k), quantize_kv(v)
    k_cache[blocks, :, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w (w the effective fp32 weight), in float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def residual_norm(x: torch.Tensor, y: torch.Tensor | None, post_w: torch.Tensor | None, w: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """csrc/fused.cpp `residual_norm`: x += y (post-normed when post_w), return norm(x) * w."""
    if y is not None:
        x += rms_norm(y, post_w, eps) if post_w is not None else y
    return rms_norm(x, w, eps)


def gated(gu: torch.Tensor, kind: int) -> torch.Tensor:
    gate, up = gu.float().chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) if kind == 0 else torch.nn.functional.gelu(gate, approximate="tanh")
    return act * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, D] with per-token rows cos/sin [T, D]."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def rope_attention(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, q_norm, k_norm,
                   eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                   seq: torch.Tensor, pos: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """csrc/attention.cpp `rope_attention`: norms, RoPE, K/V write, attention."""
    t, hkv, bs = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
    d = qkv.shape[1] // (heads + 2 * hkv)
    q, k, v = qkv.float().split([heads * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, heads, d), k.view(t, hkv, d), v.view(t, hkv, d)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    c, s = cos[pos], sin[pos]
    q, k = rope(q, c, s), rope(k, c, s)
    kv_write(k, v, k_cache, v_cache, tables[seq.long(), pos // bs].long() * bs + pos % bs)
    return attention(q, k_cache, v_cache, tables, seq, pos, window, scale).float()


def dequantize_rows(w: Packed, ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows `ids` of `w` (an embedding lookup): only the 16-row groups they fall in."""
    groups, inverse = torch.unique(ids // R, return_inverse=True)
    sub = dataclasses.replace(w, out_features=len(groups) * R, qs=w.qs[groups], d=w.d[groups],
                              mins=w.mins[groups], high=w.high[groups] if w.high.numel() else w.high,
                              sub=w.sub[groups] if w.sub.numel() else w.sub)
    return dequantize(sub)[inverse * R + ids % R]


def lora_add(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, at: torch.Tensor, bt: torch.Tensor,
             ends: torch.Tensor, active: torch.Tensor) -> None:
    """csrc/lora.cpp `lora_add`, bit for bit: per row r whose slot s >= 0 is active,
    t = sum_k AT_s[k] * x_r[k] and y_r[part p] += sum_j BT_s[j, part p] * t[p * R + j], every
    sum sequential from 0 in float32 (done here for all such rows at once)."""
    on = (slots >= 0) & active[slots.clamp(min=0).long()]
    rows = on.nonzero().flatten()
    if rows.numel() == 0:
        return
    a, b = at[slots[rows].long()], bt[slots[rows].long()]  # [n, K, PR], [n, R, N]
    xr = x[rows].float()
    t = torch.zeros(len(rows), a.shape[2])
    for k in range(a.shape[1]):
        t = t + a[:, k] * xr[:, k:k + 1]
    r = b.shape[1]
    starts = [0] + ends.tolist()[:-1]
    acc = torch.zeros(len(rows), b.shape[2])
    for p, (lo, hi) in enumerate(zip(starts, ends.tolist())):
        part = torch.zeros(len(rows), hi - lo)
        for j in range(r):
            part = part + b[:, j, lo:hi] * t[:, p * r + j:p * r + j + 1]
        acc[:, lo:hi] = part
    y[rows] = y[rows] + acc
