"""Layer importance: which layers deserve updates, measured once per architecture.

TraDy's first observation (Prop. 3.1) is that the ranking of layers by cumulative reweighted
gradient norm (RGN) depends on the architecture, not on the downstream task. So it can be
measured once, on any task, and shipped: `rank_layers` measures it; the package ships
entries for the families whose real pretrained weights are available offline
(``trady_peft/tables/*.json``, produced by ``benchmarks/build_importance_tables.py``); a
`TraDyConfig` with a top-K strategy and no ``layer_ranking`` uses the entry of its model's
family automatically.

Scores, accumulated over the fine-tuning steps (TraDy Eq. 7-8, MeDyate Eq. 9):

* ``rgn``: sum over the layer's input channels of ``||dL/dW[:, c]||_2 / (w_c + a_c)``;
* ``lara``: ``||dL/dW||_2 / sum_c (w_c + a_c)``;

with ``w_c + a_c`` a channel's cost in the paper's units (weights + input values per sample).
K is the smallest number of top layers holding 97% of the total score (TraDy App. D.5).
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.geometry import ChannelGeometry
from ..core.targets import names_match, output_heads
from ..memory.budget import layer_cost, probe_input_shapes, supported_layers
from ..memory.measure import call_model, required_loss
from .statistics import channel_norms

logger = logging.getLogger(__name__)
TABLES = Path(__file__).resolve().parent / "tables"
METRICS = ("rgn", "lara")


@dataclass
class ImportanceEntry:
    """A ranking of one architecture's layers, with where it came from.

    Attributes:
        family: the architecture family (HF ``config.model_type``, or a class name).
        metric: ``"rgn"`` or ``"lara"``.
        scores: layer name (relative to the family's backbone module) -> cumulative score.
        top_k: layers holding ``coverage`` of the total score.
        coverage: the share of the total score the top-K rule keeps (0.97).
        provenance: model, weights, data, steps, seed, versions, date.
    """

    family: str
    metric: str
    scores: dict[str, float]
    top_k: int
    coverage: float = 0.97
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> list[str]:
        """Layer names, most important first."""
        return sorted(self.scores, key=lambda n: -self.scores[n])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({**asdict(self), "ranking": self.ranking}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ImportanceEntry:
        data = json.loads(Path(path).read_text())
        data.pop("ranking", None)
        return cls(**data)


def top_k_for(scores: dict[str, float], coverage: float = 0.97) -> int:
    """Smallest K whose top-K layers hold ``coverage`` of the total score."""
    values = sorted(scores.values(), reverse=True)
    total, running = sum(values), 0.0
    for k, v in enumerate(values, start=1):
        running += v
        if running >= coverage * total:
            return k
    return len(values)


def family_of(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """(family, backbone module, its qualified name) for a model, or None.

    The family is the HF ``config.model_type`` when the model has one (backbone: its
    ``base_model``), else the class name of the first module that has a table entry.
    """
    known = {p.stem for p in TABLES.glob("*.json")}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type in known:
            backbone = getattr(module, "base_model", module)
            prefix = next(n for n, m in model.named_modules() if m is backbone)
            return model_type, backbone, prefix
        if type(module).__name__ in known:
            return type(module).__name__, module, name
    return None


def _find_backbone(model: nn.Module, family: str) -> tuple[str, nn.Module, str] | None:
    for name, module in model.named_modules():
        if getattr(getattr(module, "config", None), "model_type", None) == family:
            backbone = getattr(module, "base_model", module)
            return family, backbone, next(n for n, m in model.named_modules() if m is backbone)
        if type(module).__name__ == family:
            return family, module, name
    return None


def builtin_entry(family: str) -> ImportanceEntry | None:
    path = TABLES / f"{family}.json"
    return ImportanceEntry.load(path) if path.exists() else None


def rank_layers(
    model: nn.Module,
    dataloader: Iterable,
    steps: int = 50,
    metric: str = "rgn",
    lr: float = 1e-3,
    family: str | None = None,
    exclude_modules: Iterable[str] = (),
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> ImportanceEntry:
    """Fine-tune ``model`` (all weights, AdamW) for ``steps`` batches and rank its layers.

    Args:
        model: a plain pretrained model (not a PEFT model); it is trained in place.
        dataloader: yields one of: dicts of model inputs with labels (a Hugging Face model, or any
            model returning a loss: ``model(**batch)``); ``(inputs, labels)`` pairs, as an ordinary
            PyTorch ``DataLoader`` of a ``TensorDataset`` gives (``loss_fn(model(inputs), labels)``,
            e.g. an ``nn.Sequential``); or tensors, for a model that returns a loss. Cycled if shorter
            than ``steps``; an empty one is refused.
        steps: fine-tuning steps to accumulate scores over ("even a few epochs suffice").
        metric: ``"rgn"`` (TraDy) or ``"lara"`` (MeDyate).
        lr: learning rate of the fine-tuning.
        family: table key (default: the model's HF ``model_type`` or class name).
        exclude_modules: layers not to rank (name or suffix), e.g. the classifier head, which
            the paper always trains. Output embeddings and ``classifier``/``score`` heads are
            always left out.
        provenance: extra provenance (weights, data) recorded in the entry.
        progress: show a progress bar.
        loss_fn: the loss of ``(inputs, labels)`` batches, called as ``loss_fn(output, labels)``
            (default: cross-entropy on the output, or on its ``logits``).

    Returns:
        An `ImportanceEntry` whose ``scores`` map layer names (relative to the family's
        backbone) to their cumulative score.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} must be one of {METRICS}.")
    from tqdm.auto import tqdm

    found = _find_backbone(model, family) if family else family_of(model)
    backbone, prefix = (found[1], found[2]) if found else (model, "")
    family = family or (found[0] if found else getattr(getattr(model, "config", None), "model_type", None))
    family = family or type(model).__name__
    excluded = set(exclude_modules)
    heads = output_heads(model)
    layers = [
        (n, m)
        for n, m in supported_layers(backbone)
        if id(m) not in heads and not any(names_match(n, e) for e in excluded)
    ]
    if not layers:
        raise ValueError("No Linear/Conv layer to rank in this model.")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scores = dict.fromkeys((n for n, _ in layers), 0.0)
    costs: dict[str, Any] = {}
    seen_batches = 0
    bar = tqdm(total=steps, desc=f"ranking layers ({metric})", disable=not progress)
    while seen_batches < steps:
        seen_before = seen_batches
        for batch in dataloader:
            inputs, labels = _split_batch(batch)
            if not costs:
                shapes = probe_input_shapes(model, inputs, layers)
                for n, m in layers:
                    if n in shapes:
                        costs[n] = layer_cost(n, ChannelGeometry.of(m), *shapes[n])
            output = call_model(model, inputs)
            if labels is None:
                loss = required_loss(output, "rank_layers")
            else:
                loss = (loss_fn or _cross_entropy)(output, labels)
            loss.backward()
            with torch.no_grad():
                for n, m in layers:
                    if m.weight.grad is None or n not in costs:
                        continue
                    geometry = ChannelGeometry.of(m)
                    channels = torch.arange(geometry.in_channels, device=m.weight.device)
                    slices = geometry.read_slices(m.weight.grad, channels)
                    per_channel = costs[n].weights + costs[n].activations
                    if metric == "rgn":
                        scores[n] += float(channel_norms(slices, dtype=None).sum()) / per_channel
                    else:
                        scores[n] += float(slices.norm()) / (per_channel * geometry.in_channels)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen_batches += 1
            bar.update(1)
            if seen_batches >= steps:
                break
        if seen_batches == seen_before:
            bar.close()
            raise ValueError("rank_layers got an empty dataloader: it yielded no batch, so no layer can be ranked.")
    bar.close()
    scores = {n: s for n, s in scores.items() if n in costs}
    import peft
    import transformers

    info = {
        "model": type(model).__name__,
        "backbone_prefix": prefix,
        "steps": steps,
        "lr": lr,
        "date": datetime.date.today().isoformat(),
        "versions": {
            "trady_peft": __import__("trady_peft").__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }
    info.update(provenance or {})
    return ImportanceEntry(family, metric, scores, top_k_for(scores), provenance=info)


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(model inputs, labels or None) of one batch; a clear error for anything else."""
    if isinstance(batch, Mapping) or isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    raise TypeError(
        f"rank_layers cannot use a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        + ". Accepted batches: a dict of keyword inputs with labels (model(**batch) returns a loss, as Hugging "
        "Face models do); an (inputs, labels) pair, e.g. from a DataLoader over a TensorDataset, with any model "
        "called as model(inputs) (an nn.Sequential) and loss_fn(output, labels) (default cross-entropy); or a "
        "tensor, for a model that returns a loss."
    )


def _cross_entropy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = output
    if not isinstance(output, torch.Tensor):
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)):
            logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"rank_layers: the default loss (cross-entropy) needs the model to return logits, not "
            f"{type(output).__name__}; pass loss_fn=... ."
        )
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
