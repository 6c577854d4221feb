"""Publishing a TraDy adapter on the Hugging Face Hub with a PEFT model card.

``model.push_to_hub`` on a ``PeftModel`` comes from transformers' ``PushToHubMixin`` and replaces
the card peft writes with a generic transformers template (``library_name: transformers``).
:func:`push_to_hub` keeps peft's card (``library_name: peft``, ``base_model``) and adds what a
TraDy adapter's user needs: the configuration, the selection and, if given, measured memory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from .memory import TrainingStepMemory
from .model import find_tuner


def model_card_section(
    model: nn.Module, adapter_name: str = "default", memory: TrainingStepMemory | None = None
) -> str:
    """Markdown describing a TraDy adapter: its configuration, selection and memory."""
    tuner = find_tuner(model)
    config = tuner.peft_config[adapter_name]
    summary = tuner.selection_summary(adapter_name)
    fields = {
        k: v
        for k, v in config.to_dict().items()
        if k
        in (
            "memory_budget",
            "channels_per_layer",
            "strategy",
            "seed",
            "top_k",
            "target_modules",
            "modules_to_save",
            "memory_saving_frozen_path",
        )
    }
    lines = [
        "## TraDy adapter",
        "",
        "Trained with [trady-peft](https://pypi.org/project/trady-peft/): TraDy (Quélennec et al., ICLR 2026, "
        "arXiv 2510.19675) updates a few input channels of the network's layers, redrawn every period, under a "
        "memory budget. This adapter stores only the indices and deltas of the channels it updated.",
        "",
        "Load it with `import trady_peft` before `PeftModel.from_pretrained(base_model, repo_id)`.",
        "",
        f"- periods trained: {summary['period'] + 1}",
        f"- channels updated: {summary['touched_channels']:,} of {summary['total_channels']:,} input channels "
        f"in {summary['layers']} layers",
        "",
        "Configuration:",
        "",
        "```json",
        json.dumps(fields, indent=2, sort_keys=True, default=list),
        "```",
    ]
    if memory is not None:
        lines += [
            "",
            "Memory of one training step (measured with `trady_peft.measure_training_step`):",
            "",
            "| saved activations | trainable parameters | gradients | optimizer state |",
            "|---:|---:|---:|---:|",
            f"| {memory.saved_activations:,} B | {memory.trainable_parameters:,} B | {memory.gradients:,} B | "
            f"{memory.optimizer_state:,} B |",
        ]
    return "\n".join(lines) + "\n"


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    memory: TrainingStepMemory | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload TraDy adapter",
    revision: str | None = None,
) -> str:
    """Upload a TraDy ``PeftModel``'s adapter with a PEFT model card; returns the commit URL.

    Args:
        model: the ``PeftModel``.
        repo_id: ``"user/name"``; created if missing.
        memory: optional measured figures to put in the card.
        base_model: Hub id of the base model for the card (default: the config's
            ``base_model_name_or_path``).
        private: create the repository as private.
        token: Hub token (default: the stored login).
        commit_message: message of the upload commit.
        revision: branch to push to.

    Example:
        ```python
        trady_peft.push_to_hub(model, "me/my-sparse-adapter", memory=trady_peft.measure_training_step(...))
        ```
    """
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    adapter_names = list(model.peft_config)
    base_model = base_model or model.peft_config[adapter_names[0]].base_model_name_or_path or None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # adapter files and peft's card (library_name: peft)
        readme = Path(tmp) / "README.md"
        card = ModelCard.load(readme)
        card.data.library_name = "peft"
        tags = [t for t in (card.data.tags or []) if t != "base_model:adapter:"]
        if base_model:
            card.data.base_model = base_model
            tags.append(f"base_model:adapter:{base_model}")
        card.data.tags = [*tags, "trady", "peft"]
        card.text = card.text + "\n" + model_card_section(model, adapter_names[0], memory)
        card.save(readme)
        commit = api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message=commit_message, revision=revision)
    return str(getattr(commit, "commit_url", commit))
