"""The runner's adapter slots: a fixed number of adapters resident beside the base model,
laid out per projection for the batched kernel (csrc/lora.cpp, `kernels.lora_add`).

Each targeted projection of each layer (the fused q/k/v, o, the fused gate/up, down)
holds, per slot, A and B transposed in float32 (AT [K, P * R], BT [R, N]; R = max rank):
a part's (q, k or v; gate or up) A columns at p * R, zero-padded, the adapter's scale
folded into B. Loading an adapter into a slot writes these in place; the modules it does not
target stay zero and its `active` flag is off for projections it does not touch. A step
names each row's slot (`rows`, -1 for the base model); the layers read it while they run.
`LoRASlots.where` describes which adapter modules the model takes and their shapes, so an
adapter is checked against the model when it is registered, long before a slot loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tierlm import kernels
from tierlm.config import ConfigError
from tierlm.layers.linear import Linear
from tierlm.lora.adapter import LoRAAdapter, LoRAError

# The model's fused projections and the adapter modules (Hugging Face's names) in each.
_PROJECTIONS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                ("self_attn", "o_proj", ("o_proj",)),
                ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
                ("mlp", "down_proj", ("down_proj",)))


@dataclass(frozen=True)
class Target:
    """Where an adapter module lands: projection `key`, part `part`, its [out, in] shape."""

    key: str  # "layers.{i}.self_attn.qkv_proj"
    part: int
    out_features: int
    in_features: int


def _split(layer: Linear, parts: tuple[str, ...], model: nn.Module) -> list[int]:
    """Output sizes of a fused projection's parts."""
    if len(parts) == 1:
        return [layer.out_features]
    if len(parts) == 2:
        return [layer.out_features // 2] * 2
    cfg = model.config
    return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]


def projections(model: nn.Module) -> dict[str, tuple[Linear, dict[str, Target]]]:
    """Every projection an adapter may target: key -> (its layer, {adapter module name
    ("layers.3.self_attn.q_proj"): where it lands} for its parts in order). Sparse MoE
    blocks have no fused gate/up and are left out."""
    found = {}
    for i, layer in enumerate(model.layers):
        for owner, attr, parts in _PROJECTIONS:
            lin = getattr(getattr(layer, owner, None), attr, None)
            if isinstance(lin, Linear):
                key = f"layers.{i}.{owner}.{attr}"
                found[key] = (lin, {f"layers.{i}.{owner}.{name}": Target(key, part, n, lin.in_features)
                                    for part, (name, n) in enumerate(zip(parts, _split(lin, parts, model)))})
    return found


def check(adapter: LoRAAdapter, where: dict[str, Target]) -> None:
    """LoRAError (one line) unless every module of `adapter` fits the model."""
    for module, m in adapter.modules.items():
        t = where.get(module)
        if t is None:
            raise LoRAError(f"{adapter.path}: the model has no {module!r} to adapt (a different base model, "
                            "or a sparse MoE layer's experts, which take no adapters)")
        if tuple(m.b.shape[:1]) + tuple(m.a.shape[1:]) != (t.out_features, t.in_features):
            raise LoRAError(f"{adapter.path}: {module} is [{m.b.shape[0]}, {m.a.shape[1]}], the model's "
                            f"is [{t.out_features}, {t.in_features}] (a different base model?)")


class SlotProjection:
    """One projection's slots: AT [S, K, P * R], BT [S, R, N], `ends` [P], `active` [S]."""

    def __init__(self, owner: LoRASlots, lin: Linear, sizes: list[int], slots: int, rank: int) -> None:
        self.owner = owner
        self.A = torch.zeros(slots, lin.in_features, len(sizes) * rank)
        self.B = torch.zeros(slots, rank, lin.out_features)
        self.ends = torch.tensor(sizes, dtype=torch.long).cumsum(0)
        self.active = torch.zeros(slots, dtype=torch.bool)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus each row's adapter product (rows without an adapter unchanged)."""
        rows = self.owner.rows
        if rows is None:
            return y
        y32 = y if y.dtype == torch.float32 and y.is_contiguous() else y.float().contiguous()
        kernels.lora_add(y32, x.float().contiguous(), rows, self.A, self.B, self.ends, self.active)
        return y32 if y32 is y else y32.to(y.dtype)


class LoRASlots:
    """`max_loras` adapter slots over `model`'s projections (attached to its layers)."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        # Slots are a multiple of 8 wide: the kernel's blocks (zero columns add exact zeros).
        self.rank = -(-max_rank // 8) * 8
        found = projections(model)
        self.where = {name: t for _, parts in found.values() for name, t in parts.items()}
        # float32 A and B of every projection, per slot
        self.nbytes = 4 * max_loras * self.rank * sum(lin.in_features * len(parts) + lin.out_features
                                                      for lin, parts in found.values())
        self.projections = {}
        try:
            for key, (lin, parts) in found.items():
                sizes = [t.out_features for t in parts.values()]
                self.projections[key] = lin.lora = SlotProjection(self, lin, sizes, max_loras, self.rank)
        except RuntimeError as e:  # the allocator's refusal
            raise ConfigError(f"{max_loras} LoRA slots of rank {self.rank} need {self.nbytes / 2**30:.1f} GiB: "
                              f"{str(e).splitlines()[0]}; lower --max-loras or --max-lora-rank") from None
        self.rows: torch.Tensor | None = None  # this step's slot per row (int32 [T]); None: no adapter rows

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write `adapter` into `slot` (checked against the model when it was registered)."""
        for proj in self.projections.values():
            proj.A[slot].zero_()
            proj.B[slot].zero_()
            proj.active[slot] = False
        r = self.rank
        for module, m in adapter.modules.items():
            t = self.where[module]
            proj = self.projections[t.key]
            lo = int(proj.ends[t.part - 1]) if t.part else 0
            proj.A[slot, :, t.part * r: t.part * r + m.rank] = m.a.t()
            proj.B[slot, : m.rank, lo: lo + t.out_features] = (m.b * m.scale).t()
            proj.active[slot] = True

    def set_rows(self, rows: torch.Tensor | None) -> None:
        """This step's slot per row (int32 [T], -1 for the base model), or None for a batch
        without adapter rows."""
        self.rows = rows if rows is not None and bool((rows >= 0).any()) else None
