"""What the documentation says agrees with the code and with itself.

docs/config.md holds the table of `TraDyConfig` fields it shows (readable on the repository host);
the byte budget is defined by one sentence, the same in the config help, the README, the docs and
every `--help`; the examples' `--help` show their defaults; the FAQ's bf16 entry describes what the
Trainer does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import trady_peft

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["quickstart", "text_classification", "causal_lm", "accelerate_loop", "load_adapter"]
BUDGET_EXAMPLES = ["quickstart", "text_classification", "causal_lm", "accelerate_loop"]
#: Earlier descriptions of the byte budget, each different from the others.
OLD_BUDGET_WORDINGS = (
    "weights + input activations",
    "weights + AdamW state + activations",
    "trainable bank + the selected channels' saved inputs",
    "a bound on what the adapter adds to a step",
)


def flat(text: str) -> str:
    return " ".join(text.split())


def budget_sentence() -> str:
    """The sentence of `TraDyConfig.memory_budget`'s help that defines a byte budget."""
    field = next(f for f in dataclasses.fields(trady_peft.TraDyConfig) if f.name == "memory_budget")
    return re.search(r"A byte budget bounds [^.]*\.", field.metadata["help"]).group(0)


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def example_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser an example's `main` builds (caught when it parses)."""
    example = importlib.import_module(name)
    caught = []

    def catch(parser, *args, **kwargs):
        caught.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        example.main([])
    monkeypatch.undo()
    return caught[0]


def test_config_page_holds_the_current_table_of_fields():
    hooks = load_hooks()
    page = (ROOT / "docs" / "config.md").read_text()
    table = hooks.config_table()
    assert f"{hooks.BEGIN}\n{table}\n{hooks.END}" in page, "docs/config.md is stale: run `python docs/hooks.py`"
    own = {f.name for f in dataclasses.fields(trady_peft.TraDyConfig)} - {"peft_type", "task_type", "revision"}
    for name in ("memory_budget", "strategy", "bank_share", "max_depth"):
        assert name in own and f"| `{name}` |" in page


def test_one_sentence_defines_the_byte_budget_everywhere(capsys):
    from trady_peft_cli import build_parser

    sentence = budget_sentence()
    assert "gradient" in sentence and "optimizer state" in sentence and "saved inputs" in sentence
    for page in ("README.md", "docs/budget.md", "docs/errors.md", "docs/config.md"):
        assert sentence in flat((ROOT / page).read_text()), page
    helps = {"trady-peft memory": build_parser()._subparsers._group_actions[0].choices["memory"].format_help()}
    for name in BUDGET_EXAMPLES:
        with pytest.raises(SystemExit):
            importlib.import_module(name).main(["--help"])
        helps[name] = capsys.readouterr().out
    for name, text in helps.items():
        assert sentence in flat(text), name
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.py")]
    sources += [*(ROOT / "trady_peft").rglob("*.py"), ROOT / "trady_peft_cli.py"]
    for path in sources:
        text = flat(path.read_text())
        assert not [w for w in OLD_BUDGET_WORDINGS if w in text], path


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help_shows_every_default(name, monkeypatch):
    parser = example_parser(name, monkeypatch)
    text = flat(parser.format_help())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        assert flat(f"(default: {action.default})") in text, f"{name} {action.option_strings[0]}"


def test_the_faq_says_how_to_compare_a_reload_with_a_model_trained_in_bf16(tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    from tests.tiny_models import tiny_cnn

    faq = flat((ROOT / "docs" / "faq.md").read_text())
    assert "keep_fp32_wrapper=False" in faq and "bf16=True" in faq

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 4)} for i in range(32)]
    config = trady_peft.TraDyConfig(channels_per_layer=0.5, strategy="d-full-random", modules_to_save=["classifier"])
    model = get_peft_model(tiny_cnn(), config)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, bf16=True, use_cpu=True,
        report_to="none", save_strategy="no", learning_rate=1e-2, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[trady_peft.TraDyCallback()])
    trainer.train()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_cnn(), tmp_path / "adapter").eval()
    x = torch.stack([d["pixel_values"] for d in data[:8]])
    with torch.no_grad():
        as_left = model.eval()(pixel_values=x)["logits"]
        assert "_original_forward" in model.__dict__  # the Trainer's autocast wrapper is still there
        unwrapped = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        assert unwrapped is model and "_original_forward" not in model.__dict__
        exact, again = reloaded(pixel_values=x)["logits"], unwrapped(pixel_values=x)["logits"]
    assert (as_left - exact).abs().max() > 1e-4
    torch.testing.assert_close(again, exact, rtol=0, atol=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="needs `make setup` (efficientnet packages)"
)
def test_the_readme_quickstart_figures_are_what_the_code_measures_with_the_threads_it_names():
    """The quickstart's memory columns (of the first period) and its layer counts, measured on a batch of its
    shape: what autograd keeps depends on shapes, not on pixel values."""
    import quickstart

    readme = (ROOT / "README.md").read_text()
    intro, table = readme.split("Output of `make quickstart`")[1].split("```")[:2]
    assert re.search(r"\b2 torch threads\b", flat(intro))
    row = re.search(r"^TraDy +[\d.]+ +([\d,]+ KiB) +([\d,]+ KiB) +([\d,]+ KiB) +([\d,]+ KiB)", table, re.M).groups()
    # the selection line is of the last period (each draws anew): its fixed parts are the layers and channels
    layers = re.search(r"of (\d+) input channels train per epoch in the top (\d+) of (\d+) layers", table)

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 64, 64, generator=g), torch.randint(0, 10, (32,), generator=g)

    class Rows:  # the slice of a datasets.Dataset that `measure` takes
        def __getitem__(self, rows):
            return {"pixel_values": images[rows], "labels": labels[rows]}

    model = quickstart.build("TraDy", None, seed=0)  # no --budget: TraDy's default budget
    memory = quickstart.measure(model, Rows(), batch_size=32, lr=3e-3)
    measured = [memory.saved_activations, memory.trainable_parameters, memory.gradients, memory.optimizer_state]
    assert tuple(quickstart.kib(n) for n in measured) == row
    summary = model.base_model.selection_summary()
    expected = tuple(int(n) for n in layers.groups())
    assert (summary["total_channels"], summary["candidate_layers"], summary["layers"]) == expected
