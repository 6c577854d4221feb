"""Side-by-side memory of one training step: TraDy, peft LoRA on the same layers, full fine-tuning.

Every figure is measured by `measure_training_step` on a fresh copy of
the model; nothing is estimated. Used by ``trady-peft memory`` and the benchmarks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from .config import TraDyConfig
from .memory.measure import TrainingStepMemory, measure_training_step

# Module types grouped into the parts of a network a report talks about.
PATH_GROUPS = {
    "selected ch.": ("TraDyLayer",),
    "linear/conv in": ("Linear", "Conv1d", "Conv2d", "Conv1D"),
    "normalization": ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm"),
    "attention": ("Attention",),
    "activations": ("ReLU", "GELU", "SiLU", "Tanh", "Hardtanh", "Activation", "MLP"),
}


def stock_type_name(module_type: str) -> str:
    """The stock class a frozen-path twin replaces (``FrozenPathLlamaMLP`` -> ``LlamaMLP``; the fused
    loss's ``FrozenPathLMHead`` -> ``Linear``); any other name unchanged."""
    if module_type == "FrozenPathLMHead":
        return "Linear"
    if module_type.startswith("FrozenPath"):
        return module_type.removeprefix("FrozenPath").rstrip("_")
    return module_type


def saved_by_stock_type(memory: TrainingStepMemory) -> dict[str, int]:
    """``memory.saved_by_module_type`` with each twin's bytes counted under the stock class it replaces."""
    out: dict[str, int] = {}
    for kind, nbytes in memory.saved_by_module_type.items():
        key = stock_type_name(kind)
        out[key] = out.get(key, 0) + nbytes
    return out


def group_of(module_type: str) -> str:
    for group, markers in PATH_GROUPS.items():
        if any(m in module_type for m in markers):
            return group
    return "other"


@dataclass
class MethodMemory:
    method: str
    memory: TrainingStepMemory
    weights: int
    note: str = ""
    extra_weights: dict[str, int] = field(default_factory=dict)  # parameters held besides the base model's

    @property
    def saved_by_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, nbytes in self.memory.saved_by_module_type.items():
            g = group_of(kind)
            out[g] = out.get(g, 0) + nbytes
        return out


@dataclass
class MemoryReport:
    """Measured memory of one training step per method (see `compare_memory`)."""

    rows: list[MethodMemory]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    trady_model: nn.Module | None = None  # the measured TraDy model, for further analysis
    #: TraDy measured with the stock frozen path (``memory_saving_frozen_path=False``): the "before" of
    #: `frozen_path_split`; None when not measured.
    stock_frozen_path: MethodMemory | None = None

    def row(self, method: str) -> MethodMemory:
        return next(r for r in self.rows if r.method == method)

    def saving_factor(self, baseline: str) -> float:
        """``baseline``'s saved-activation bytes over TraDy's."""
        return self.row(baseline).memory.saved_activations / max(1, self.row("TraDy").memory.saved_activations)

    def table(self) -> str:
        kib = lambda n: f"{n / 1024:,.0f} KiB"  # noqa: E731
        head = f"{'method':<20}{'weights':>14}{'trainable':>13}{'gradients':>13}{'optim state':>13}{'saved acts':>14}"
        lines = [self.description, head, "-" * len(head)] if self.description else [head, "-" * len(head)]
        for r in self.rows:
            m = r.memory
            lines.append(
                f"{r.method:<20}{kib(r.weights):>14}{kib(m.trainable_parameters):>13}{kib(m.gradients):>13}"
                f"{kib(m.optimizer_state):>13}{kib(m.saved_activations):>14}"
            )
        lines.append("")
        lines.append("saved activations by part of the network:")
        groups = sorted({g for r in self.rows for g in r.saved_by_group})
        lines.append(f"{'':<20}" + "".join(f"{g:>16}" for g in groups))
        for r in self.rows:
            sb = r.saved_by_group
            lines.append(f"{r.method:<20}" + "".join(f"{kib(sb.get(g, 0)):>16}" for g in groups))
        split = self.frozen_path_split()
        if split:
            lines += ["", *split]
        notes = [f"{r.method}: {r.note}" for r in self.rows if r.note]
        notes += [f"full fine-tuning / TraDy saved activations: {self.saving_factor('full fine-tuning'):,.1f}x"]
        notes += self.explanations()
        notes += [f"{k}: {v}" for k, v in self.extra.items()]
        if notes:
            lines.append("")
            lines += notes
        return "\n".join(lines)

    def frozen_path_split(self) -> list[str]:
        """Lines of the table: TraDy's saved activations by module type with the stock frozen path (before)
        and with the memory-saving twins (after), LoRA's alongside; a twin counts under the class it replaces."""
        if self.stock_frozen_path is None:
            return []
        kib = lambda n: f"{n / 1024:,.0f} KiB"  # noqa: E731
        columns = {
            "TraDy, stock path": saved_by_stock_type(self.stock_frozen_path.memory),
            "TraDy, twins": saved_by_stock_type(self.row("TraDy").memory),
        }
        if any(r.method == "LoRA" for r in self.rows):
            columns["LoRA"] = saved_by_stock_type(self.row("LoRA").memory)
        kinds = sorted(
            {k for c in columns.values() for k in c}, key=lambda k: -max(c.get(k, 0) for c in columns.values())
        )
        lines = [
            "saved activations by module type, TraDy before (stock frozen path) and after (frozen-path twins, "
            "memory_saving_frozen_path=True):",
            f"{'module type':<28}" + "".join(f"{name:>20}" for name in columns),
        ]
        for kind in kinds:
            lines.append(f"{kind:<28}" + "".join(f"{kib(c.get(kind, 0)):>20}" for c in columns.values()))
        lines.append(f"{'total':<28}" + "".join(f"{kib(sum(c.values())):>20}" for c in columns.values()))
        return lines

    def explanations(self) -> list[str]:
        """One sentence for each figure that looks wrong at first sight: a method that holds more weights
        than full fine-tuning, and LoRA keeping more activations than full fine-tuning."""
        kib = lambda n: f"{n / 1024:,.0f} KiB"  # noqa: E731
        methods = {r.method for r in self.rows}
        if not {"LoRA", "full fine-tuning"} <= methods:
            return []
        full = self.row("full fine-tuning")
        out = []
        for r in self.rows:
            if r is not full and r.weights > full.weights and r.extra_weights:
                parts = " and ".join(f"{what} ({kib(n)})" for what, n in r.extra_weights.items() if n)
                out.append(
                    f"{r.method}'s weights exceed full fine-tuning's by {kib(r.weights - full.weights)}: {parts}."
                )
        lora = self.row("LoRA")
        if lora.memory.saved_activations > full.memory.saved_activations:
            out.append(
                f"LoRA saves {kib(lora.memory.saved_activations - full.memory.saved_activations)} more activations "
                "than full fine-tuning: each wrapped layer still keeps its input (PyTorch's frozen convolution "
                "keeps it too, pytorch/pytorch#133566) and LoRA adds the output of its A factor, kept for B's "
                "gradient."
            )
        return out

    def plot(self, path: str) -> str:
        """Save a bar chart (stacked: trainable, gradients, optimizer state, saved activations) as PNG."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("Plotting needs matplotlib: pip install 'trady-peft[plot]'.") from err
        parts = ["trainable_parameters", "gradients", "optimizer_state", "saved_activations"]
        labels = ["trainable weights", "gradients", "optimizer state", "saved activations"]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        bottoms = [0.0] * len(self.rows)
        for part, label in zip(parts, labels):
            values = [getattr(r.memory, part) / 2**20 for r in self.rows]
            ax.bar([r.method for r in self.rows], values, bottom=bottoms, label=label)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        for i, total in enumerate(bottoms):
            ax.text(i, total, f"{total:,.1f} MiB", ha="center", va="bottom", fontsize=9)
        ax.set_ylabel("MiB, one training step (measured)")
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(self.description, 80)), fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _bytes_of(model: nn.Module, marker: str = "") -> int:
    """Bytes of ``model``'s parameters whose names contain ``marker`` (default: every parameter)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if marker in n)


def _measured_footprint(trady: nn.Module, mem: TrainingStepMemory, optimizer, budget: int) -> str:
    """The adapter's measured footprint in one step: the bank's parameter, gradient and per-value
    optimizer state, plus what autograd kept inside the TraDy layers (saved-tensor hooks)."""
    tuner = trady.base_model
    layers = {f"base_model.model.{n}" for n, _ in tuner.trady_layers()}
    saved = sum(b for n, b in mem.saved_by_module.items() if n in layers)
    bank = 0
    for p in tuner.trady_bank.parameters():
        state = [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
        bank += sum(t.numel() * t.element_size() for t in [p, *([p.grad] if p.grad is not None else []), *state])
    total = bank + saved
    return f"measured footprint {total:,} B (bank {bank:,} + saved inputs {saved:,}) of the {budget:,}-byte budget"


def lora_targets(peft_model: nn.Module, rank: int) -> tuple[list[str], list[str]]:
    """TraDy's layers that peft LoRA can also wrap (its grouped convs need rank % groups == 0)."""
    ok, skipped = [], []
    for name, m in peft_model.base_model.trady_layers():
        groups = m.geometry.groups
        (ok if groups == 1 or rank % groups == 0 else skipped).append(name)
    return ok, skipped


def compare_memory(
    build_model: Callable[[], nn.Module],
    inputs: Any,
    config: TraDyConfig,
    lora_r: int = 8,
    optimizer: str = "adamw",
    description: str = "",
    frozen_path_split: bool = False,
) -> MemoryReport:
    """Measure one training step of TraDy, LoRA (rank ``lora_r``, same layers) and full fine-tuning.

    Args:
        build_model: returns a fresh pretrained (or config-built) model each call.
        inputs: one batch: a tensor or a dict of keyword arguments (with labels for a real loss).
        config: the TraDy configuration (its ``modules_to_save`` train fully in every method).
        lora_r: LoRA rank.
        optimizer: ``"adamw"`` or ``"sgd"`` (plain SGD, the paper's setting: no optimizer state).
        frozen_path_split: also measure TraDy with the stock frozen path (``memory_saving_frozen_path=False``),
            for the table's split by module type before/after the twins (`MemoryReport.frozen_path_split`;
            ``trady-peft memory`` does, unless ``--no-frozen-path-split``).
    """

    def make_optimizer(model):
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.0)
        return torch.optim.AdamW(params, lr=0.0)

    rows = []
    trady = get_peft_model(build_model(), copy.deepcopy(config)).train()
    trady_optimizer = make_optimizer(trady)
    trady_mem = measure_training_step(trady, inputs, trady_optimizer)
    summary = trady.base_model.selection_summary()
    note = f"{summary['selected_channels']:,} of {summary['total_channels']:,} input channels selected"
    if "selected_cost" in summary:
        unit = summary["unit"]
        note += f", cost {summary['selected_cost']:,} of a {summary['budget']:,}-{unit} budget"
        if "step_memory" in summary:
            note += f" (what step_memory={config.step_memory!r} leaves)"
        if unit == "bytes":  # the budget is a bound: show what the step really added, measured
            note += "; " + _measured_footprint(trady, trady_mem, trady_optimizer, summary["budget"])
    # The bank is the tuner's, not the base model's: it counts in `trainable`, not in `weights`.
    copies = "peft's trainable copy of modules_to_save, kept next to the frozen original"
    extra = {copies: _bytes_of(trady, "modules_to_save")}
    rows.append(MethodMemory("TraDy", trady_mem, _bytes_of(trady.get_base_model()), note, extra))

    targets, skipped = lora_targets(trady, lora_r)
    lora_config = LoraConfig(r=lora_r, target_modules=targets, modules_to_save=config.modules_to_save)
    lora = get_peft_model(build_model(), lora_config).train()
    note = f"r={lora_r} on {len(targets)} layers" + (
        f"; {len(skipped)} grouped convs LoRA cannot wrap" if skipped else ""
    )
    extra = {
        f"the rank-{lora_r} A and B factors": _bytes_of(lora, "lora_"),
        copies: _bytes_of(lora, "modules_to_save"),
    }
    lora_mem = measure_training_step(lora, inputs, make_optimizer(lora))
    rows.append(MethodMemory("LoRA", lora_mem, _bytes_of(lora), note, extra))

    full = build_model().train()
    for p in full.parameters():
        p.requires_grad_(True)
    rows.append(
        MethodMemory("full fine-tuning", measure_training_step(full, inputs, make_optimizer(full)), _bytes_of(full))
    )
    stock = None
    if frozen_path_split and config.memory_saving_frozen_path:
        stock_config = copy.deepcopy(config)
        stock_config.memory_saving_frozen_path = False
        stock_model = get_peft_model(build_model(), stock_config).train()
        stock_mem = measure_training_step(stock_model, inputs, make_optimizer(stock_model))
        stock = MethodMemory("TraDy, stock frozen path", stock_mem, _bytes_of(stock_model.get_base_model()))
        del stock_model
    return MemoryReport(rows, description, trady_model=trady, stock_frozen_path=stock)
