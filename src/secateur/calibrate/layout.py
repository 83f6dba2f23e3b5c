"""How a checkpoint stores a block's tensors where the model holds them otherwise.

transformers 5 holds a mixture of experts' routed experts fused (`gate_up_proj`: (experts, 2 x width,
hidden), gate rows then up rows; `down_proj`: (experts, hidden, width)) but loads and saves them one
matrix per expert and projection (`mlp.experts.7.gate_proj.weight`), the layout of the published
checkpoints; Mixtral's checkpoints also name the MoE module `block_sparse_moe` and the projections
w1 (gate), w3 (up) and w2 (down). A model streamed from disk (`calibrate.disk.DiskBlocks`) reads each
fused tensor from those pieces, straight into its slices, and writes a pruned block back in the
layout its input had, so stock `from_pretrained` loads the output as it loads `save_pretrained`'s.

A `Piece` is one stored tensor and where it lies in the model's tensor: `None` (the whole tensor) or
(expert, first row, end row).
"""

from __future__ import annotations

from dataclasses import dataclass

from secateur.models import Adapter

Piece = tuple[str, "tuple[int, int, int] | None"]  # (stored block-relative name, (expert, row, end row) or whole)


@dataclass(frozen=True)
class Layout:
    """The stored names of one model's block tensors. `fused`: the experts stored as the model holds
    them; otherwise `experts` (the model's experts module, block-relative) is stored per expert, under
    `module` renamed to `stored_module`, with the projections named `projections` (gate, up, down)."""

    experts: str | None = None  # None: every tensor stored under its own name
    module: str = ""
    stored_module: str = ""
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def stored(self, name: str) -> str:
        """The stored name of a block-relative tensor that is not fused (the MoE module renamed)."""
        if self.experts is not None and self.module != self.stored_module and name.startswith(self.module + "."):
            return self.stored_module + name[len(self.module) :]
        return name

    def pieces(self, name: str, shape: tuple[int, ...]) -> list[Piece]:
        """Where the block-relative tensor `name` of `shape` is stored, piece by piece."""
        fused = f"{self.experts}.gate_up_proj", f"{self.experts}.down_proj"
        if self.experts is None or name not in fused:
            return [(self.stored(name), None)]
        base = self.stored(self.experts)
        gate, up, down = self.projections
        if name == fused[1]:  # (experts, hidden, width): one matrix per expert
            return [(f"{base}.{j}.{down}.weight", (j, 0, shape[1])) for j in range(shape[0])]
        width = shape[1] // 2  # (experts, 2 x width, hidden): gate rows, then up rows
        return [piece for j in range(shape[0]) for piece in
                ((f"{base}.{j}.{gate}.weight", (j, 0, width)), (f"{base}.{j}.{up}.weight", (j, width, 2 * width)))]  # fmt: skip


def layout_of(adapter: Adapter, stored: set[str]) -> Layout:
    """The layout of a checkpoint whose tensor names are `stored`: experts fused where the model's
    fused names are there, per expert (the family's names) otherwise."""
    spec = adapter.experts
    if spec is None or any(name.endswith(f".{spec.experts}.gate_up_proj") for name in stored):
        return Layout()
    return Layout(spec.experts, spec.module, spec.stored_module or spec.module, spec.stored_projections)
