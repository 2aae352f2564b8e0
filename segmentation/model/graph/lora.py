"""LoRA adapters inside the graph engine's fixed-shape step: every adapter's weights stacked in static tensors.

PEFT applies unmerged adapters row by row with Python hooks (`_mixed_batch_forward`: one gather and two small
matmuls per distinct adapter of a batch, on every call): a step holding an adapter row could not replay the
base model's CUDA graph, so it ran eagerly through the hooks (`seg_engine_steps_total{path="peft"}`). Here,
as in S-LoRA and Punica (and vLLM's LoRA layers), every linear layer of the language model that an adapter
targets holds all adapters at once in two static tensors

    A [(S + 1) * R, in]   B [(S + 1) * R, out]   scale [S + 1]

with S slots plus slot 0, which stays zero for base rows, and R the slot rank: an adapter of rank r <= R fills
rows s*R .. s*R + r of its slot s and leaves the rest zero; a module it does not target stays zero in its slot.
S and R are the adapters attached at start and their highest rank, capped by `SEG_MAX_ADAPTERS` and
`SEG_MAX_LORA_RANK` (`reserve=True` allocates the caps themselves: free slots to load adapters into later).
The caps are not the default size because every row pays for every slot: (S + 1) * R * (in + out)
multiply-adds per layer and row. For three rank-4 adapters on every projection of the medium test model that
is 6 % of a step's multiply-adds sized to them, 50 % at the caps (8 slots of rank 16). Each row of the step
names its slot in an index tensor, and the update of rows x [b, n, in] with slots idx [b] is

    shrink  t = x @ A.T                     [b, n, S + 1, R]   every slot's low-rank projection
    gather  t = t * onehot(idx)             only the row's own slot survives (exact zeros elsewhere)
    expand  y = t @ B * scale[idx]          [b, n, out]        = lora_B(lora_A(x)) * scaling of that slot

Fixed shapes and no host synchronisation for any mix of rows, so one captured graph serves base rows and
adapter rows together; a slot is filled by copying into it (the tensors never move, graphs stay valid).
Reading every slot's A and B once per step (not once per row, as a per-row gather of weights would) costs
(S + 1) * R * (in + out) per module: small next to the base weight for a few slots of rank 16.

Adapters this cannot hold run as before through PEFT's hooks (their rows' steps are counted `peft`):
LoRA variants (DoRA and the like), a bias on lora_B, embedding LoRA in the language model, a rank above R,
more adapters than slots. `LoraSlots.refused` says which and why (the engine logs it, /models shows it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The language model's linear layers a step calls (per decoder layer), and the output layer.
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_MAX_ADAPTERS = 8
DEFAULT_MAX_RANK = 16


def is_lora_layer(module: torch.nn.Module) -> bool:
    """A PEFT LoRA wrapper (it keeps the original layer as `base_layer`)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def base_of(module: torch.nn.Module) -> torch.nn.Module:
    """The layer a PEFT wrapper wraps (the module itself when it is not wrapped)."""
    return module.base_layer if is_lora_layer(module) else module


@dataclass
class Stack:
    """One linear layer's adapters: A [(S+1)*R, in], B [(S+1)*R, out], scale [S+1] (slot 0: zeros)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    rank: int

    def delta(self, x: torch.Tensor, onehot: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The low-rank update of rows x [b, n, in]: `onehot` [b, S+1] selects each row's slot, `scale` [b]
        is that slot's scaling (`scales(idx)`). Returns [b, n, out] in x's dtype."""
        rows, tokens = x.shape[0], x.shape[1]
        t = torch.matmul(x.to(self.a.dtype), self.a.t())  # shrink: [b, n, (S+1)*R]
        t = (t.view(rows, tokens, onehot.shape[1], self.rank) * onehot[:, None, :, None]).view(rows, tokens, -1)
        y = torch.matmul(t, self.b) * scale[:, None, None]  # expand, then the slot's scaling (as PEFT)
        return y.to(x.dtype)


class SlotRefused(ValueError):
    """An adapter the stacked weights cannot take: `full` when only a free slot is missing."""

    def __init__(self, why: str, *, full: bool = False):
        super().__init__(why)
        self.full = full


class LoraSlots:
    """The stacked adapters of a PEFT-wrapped PaliGemma's language model (see the module docstring).

    `modules`: module name -> PEFT LoRA wrapper, for the linear layers a step calls; `adapters`: PEFT adapter
    names in the order they get slots. `slot_of[name]` is an adapter's slot (1..S); `refused[name]` why an
    adapter has none (its rows go through PEFT).
    """

    def __init__(self, modules: dict[str, torch.nn.Module], adapters: list[str], *,
                 max_adapters: int = DEFAULT_MAX_ADAPTERS, max_rank: int = DEFAULT_MAX_RANK,
                 embedding_adapters: frozenset[str] = frozenset(), reserve: bool = False):
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"LoRA slots need max_adapters and max_rank of 1 or more ({max_adapters}, {max_rank})")
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.slot_of: dict[str, int] = {}
        self.refused: dict[str, str] = {}
        self.ranks: dict[str, int] = {}
        self.targets: dict[str, list[str]] = {}
        wrapped = {name: m for name, m in modules.items() if is_lora_layer(m)}
        for adapter in adapters:
            why = self._unsupported(adapter, wrapped, embedding_adapters)
            if why is None and len(self.slot_of) >= max_adapters:
                why = f"no free slot (SEG_MAX_ADAPTERS={max_adapters})"
            if why is not None:
                self.refused[adapter] = why
                continue
            self.slot_of[adapter] = len(self.slot_of) + 1
        # The stacks' shape: the caps when reserving room, else what the attached adapters need.
        self.slot_count = max_adapters if reserve else max(1, len(self.slot_of))
        self.rank = max_rank if reserve else max([1, *(self.ranks[a] for a in self.slot_of)])
        self.stacks: dict[str, Stack] = {}
        for name, module in wrapped.items():
            placed = [a for a in self.slot_of if a in module.lora_A]
            # Reserving: every wrapped layer gets its stack now (adapters loaded later fill slots of it; a
            # stack made later would not be in the graphs captured at start).
            if placed or (reserve and len(module.lora_A)):
                self.stacks[name] = self._stack(module, placed)
        device = next(iter(self.stacks.values())).a.device if self.stacks else torch.device("cpu")
        self.onehot = torch.eye(self.slot_count + 1, device=device)

    def _unsupported(self, adapter: str, wrapped: dict[str, torch.nn.Module], embedding: frozenset[str]) -> str | None:
        if adapter in embedding:
            return "it adapts the language model's embedding (only linear layers are stacked)"
        rank = 0
        targets = []
        for name, module in wrapped.items():
            if adapter not in module.lora_A:
                continue
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter):
                return f"a LoRA variant (DoRA or another) at {name}"
            if getattr(module, "fan_in_fan_out", False) or module.lora_B[adapter].bias is not None:
                return f"a lora_B bias or transposed weights at {name}"
            rank = max(rank, module.lora_A[adapter].weight.shape[0])
            targets.append(name.rsplit(".", 1)[-1])
        if rank > self.max_rank:
            return f"rank {rank} exceeds the slot rank (SEG_MAX_LORA_RANK={self.max_rank})"
        self.ranks[adapter] = rank
        self.targets[adapter] = sorted(set(targets))
        return None

    def _stack(self, module: torch.nn.Module, adapters: list[str]) -> Stack:
        base = module.base_layer
        first = module.lora_A[adapters[0] if adapters else next(iter(module.lora_A))].weight
        device, dtype = first.device, first.dtype  # PEFT computes the update in the adapter's dtype
        width = (self.slot_count + 1) * self.rank
        a = torch.zeros(width, base.in_features, device=device, dtype=dtype)
        b = torch.zeros(width, base.out_features, device=device, dtype=dtype)
        scale = torch.zeros(self.slot_count + 1, device=device, dtype=dtype)
        stack = Stack(a, b, scale, self.rank)
        for adapter in adapters:
            self.fill(stack, self.slot_of[adapter], module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                      module.scaling[adapter])
        return stack

    @torch.no_grad()
    def fill(self, stack: Stack, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Copy one adapter's A [r, in], B [out, r] and scaling into `slot` of `stack` (zero-padded to R)."""
        rank = lora_a.shape[0]
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        stack.a[rows].zero_()
        stack.b[rows].zero_()
        stack.a[rows][:rank] = lora_a
        stack.b[rows][:rank] = lora_b.t()
        stack.scale[slot] = scaling

    # --- adapters loaded and unloaded while serving (into the slots reserved at start) -------------------

    @property
    def free_slots(self) -> list[int]:
        """Slots no adapter holds (1..S)."""
        return sorted(set(range(1, self.slot_count + 1)) - set(self.slot_of.values()))

    @torch.inference_mode()  # the stacks were made in inference mode: only there may they change in place
    def place(self, adapter: str, modules: dict[str, torch.nn.Module]) -> int:
        """Copy a PEFT adapter that was just added to the wrapped model (`modules`: `lora_modules()`, the same
        wrappers the stacks were made for) into the lowest free slot, in place: the stacks never move, so
        graphs captured at start stay valid. Returns its slot; raises SlotRefused (nothing written) when it
        does not fit: a LoRA variant, a rank above the slot's, a targeted layer without a stack, no free slot."""
        wrapped = {name: m for name, m in modules.items() if is_lora_layer(m)}
        why = self._unsupported(adapter, wrapped, frozenset())
        if why is None:
            outside = sorted(name for name, m in wrapped.items() if adapter in m.lora_A and name not in self.stacks)
            if outside:
                why = f"it adapts {outside[0]}, a layer the stacked weights do not cover"
        if why is None and self.ranks[adapter] > self.rank:
            why = f"rank {self.ranks[adapter]} exceeds the slot rank ({self.rank})"
        if why is not None:
            self.ranks.pop(adapter, None)
            self.targets.pop(adapter, None)
            raise SlotRefused(why)
        if not self.free_slots:
            raise SlotRefused(f"no free slot: all {self.slot_count} hold adapters (SEG_MAX_ADAPTERS)", full=True)
        slot = self.free_slots[0]
        for name, stack in self.stacks.items():
            module = wrapped[name]
            if adapter in module.lora_A:
                self.fill(stack, slot, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                          module.scaling[adapter])
            else:
                self.clear_slot(stack, slot)
        self.slot_of[adapter] = slot
        return slot

    @torch.inference_mode()
    def remove(self, adapter: str) -> None:
        """Zero an adapter's slot in every stack and free it (no row may still name it)."""
        slot = self.slot_of.pop(adapter)
        self.ranks.pop(adapter, None)
        self.targets.pop(adapter, None)
        for stack in self.stacks.values():
            self.clear_slot(stack, slot)

    def clear_slot(self, stack: Stack, slot: int) -> None:
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        stack.a[rows].zero_()
        stack.b[rows].zero_()
        stack.scale[slot] = 0.0

    def slots(self, names: list[str]) -> list[int]:
        """Each row's slot for PEFT adapter names (`__base__`, or an adapter without a slot: 0)."""
        return [self.slot_of.get(name, 0) for name in names]

    def stackable(self, names: list[str]) -> bool:
        """Whether rows with these adapter names all run in the stacked step (no PEFT hooks needed)."""
        return all(name not in self.refused for name in names)

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.stacks.values() for t in (s.a, s.b, s.scale))

    def describe(self, adapter: str) -> dict:
        """What /models says about one adapter's place in the step."""
        slot = self.slot_of.get(adapter)  # read while adapters load and unload on the engine's thread
        if slot is not None:
            return {"slot": slot, "rank": self.ranks.get(adapter), "slot_rank": self.rank,
                    "modules": self.targets.get(adapter, [])}
        return {"slot": None, "why": self.refused.get(adapter, "not attached")}
