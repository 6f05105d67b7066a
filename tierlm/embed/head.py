"""The output layer of a decoder that embeds (`--task embed`): none. `strip_head` puts
`HiddenHead` in its place at load, so every forward path of the model yields the final
norm's output (the hidden states embed/decoder.py pools) where it yielded logits."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


class HiddenHead(nn.Module):
    """The output layer of a decoder that embeds: its input (the final norm's output) is the output."""

    quantized = None  # rows_by_format: one format for every row

    def forward(self, x: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        return x


def strip_head(model: nn.Module) -> None:
    """Make `model` return hidden states where it returned logits."""
    model.lm_head = HiddenHead()
    if getattr(model.config, "final_logit_softcap", None) is not None:  # a logits transform, not the model's
        model.config = dataclasses.replace(model.config, final_logit_softcap=None)
