"""Publishing a TraDy adapter on the Hugging Face Hub with a PEFT model card.

``model.push_to_hub`` on a ``PeftModel`` comes from transformers' ``PushToHubMixin`` and replaces
the card peft writes with a generic transformers template (``library_name: transformers``).
`push_to_hub` keeps peft's card (``library_name: peft``, ``base_model``) and adds what a
TraDy adapter's user needs: the configuration, the selection and, if given, measured memory.

``save_pretrained`` writes the same TraDy section into the card it saves (`add_card_section`,
done by ``import trady_peft``), so a saved adapter's README says that ``import trady_peft`` is
needed to load it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from .memory.measure import TrainingStepMemory
from .model import find_tuner

SECTION_HEADING = "## TraDy adapter"


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
            "step_memory",
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
        SECTION_HEADING,
        "",
        "Trained with [trady-peft](https://pypi.org/project/trady-peft/): TraDy (Quélennec et al., ICLR 2026, "
        "arXiv 2510.19675) updates a few input channels of the network's layers, redrawn every period, under a "
        "memory budget. This adapter stores only the indices and deltas of the channels it updated.",
        "",
        "**Loading needs `import trady_peft`** (it registers the method with peft) before "
        "`PeftModel.from_pretrained(base_model, repo_id)`; without it peft fails with `KeyError: 'TRADY'`. "
        "Install it with `pip install trady-peft`.",
        "",
        "```python",
        "import trady_peft  # noqa: F401  (registers TraDy with peft)",
        "from peft import PeftModel",
        "",
        "model = PeftModel.from_pretrained(base_model, repo_id)",
        "```",
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
        card.text = with_section(card.text, model_card_section(model, adapter_names[0], memory))
        card.save(readme)
        commit = api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message=commit_message, revision=revision)
    return str(getattr(commit, "commit_url", commit))


def with_section(text: str, section: str) -> str:
    """``text`` with its TraDy section (from `SECTION_HEADING` to the end) replaced by ``section``."""
    at = text.find("\n" + SECTION_HEADING + "\n")
    if at >= 0:
        text = text[:at]
    return text.rstrip("\n") + "\n\n" + section


def _trady_adapter(model: nn.Module) -> str | None:
    configs = getattr(model, "peft_config", None) or {}
    return next((name for name, c in configs.items() if getattr(c, "peft_type", None) == "TRADY"), None)


def add_card_section(peft_model, output_dir: str) -> None:
    """Add the TraDy section (and the `trady` tag) to the card ``save_pretrained`` wrote in ``output_dir``.

    Called after peft writes its card (see `trady_peft._patches.install`); does nothing for a model
    without a TraDy adapter.
    """
    from huggingface_hub import ModelCard

    adapter = _trady_adapter(peft_model)
    readme = Path(output_dir) / "README.md"
    if adapter is None or not readme.exists():
        return
    try:
        section = model_card_section(peft_model, adapter)
    except Exception:  # a card without the selection summary still tells how to load
        section = f"{SECTION_HEADING}\n\nLoading needs `import trady_peft` (it registers TraDy with peft).\n"
    card = ModelCard.load(readme)
    tags = [t for t in (card.data.tags or []) if t != "trady"]
    card.data.tags = [*tags, "trady"]
    card.text = with_section(card.text, section)
    card.save(readme)
