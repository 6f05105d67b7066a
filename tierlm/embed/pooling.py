"""Pooling and normalisation of hidden states into one vector per input (pure functions).

The modes are sentence-transformers' names (its Pooling module's config) plus `last`
for decoder models, whose last token is the only one that has seen the whole input.
Each input's vector comes from its own rows only, in a fixed order: batch-invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("mean", "cls", "max", "last", "mean_sqrt_len")


def pool(hidden: torch.Tensor, lens: list[int], mode: str) -> torch.Tensor:
    """hidden [T, H] holding the inputs' rows one after another (`lens` each) -> [N, H] float32."""
    if mode not in MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; known: {', '.join(MODES)}")
    out = []
    for rows in hidden.float().split(lens):
        if mode == "cls":
            out.append(rows[0])
        elif mode == "last":
            out.append(rows[-1])
        elif mode == "max":
            out.append(rows.max(dim=0).values)
        else:
            total = rows.sum(dim=0)
            out.append(total / (len(rows) ** 0.5 if mode == "mean_sqrt_len" else len(rows)))
    return torch.stack(out) if out else hidden.new_empty(0, hidden.shape[1], dtype=torch.float32)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit L2 length per row (rows of zeros stay zero)."""
    return F.normalize(x, p=2.0, dim=-1)


def shorten(x: torch.Tensor, dimensions: int | None, normalized: bool) -> torch.Tensor:
    """The first `dimensions` components (Matryoshka models), unit length again when the
    model's vectors are normalized."""
    if dimensions is None or dimensions == x.shape[-1]:
        return x
    x = x[:, :dimensions]
    return normalize(x) if normalized else x
