"""Issue 15: what a newcomer trips over first (ordinary DataLoaders, units, cards, the memory command)."""

from __future__ import annotations

import signal
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trady_peft
from trady_peft.cli import main


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _xy_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    return DataLoader(data, batch_size=8)


def test_rank_layers_takes_an_ordinary_xy_dataloader_and_a_sequential():
    entry = trady_peft.rank_layers(_sequential(), _xy_loader(), steps=6, progress=False)
    assert set(entry.scores) == {"0", "2", "4"} and all(s > 0 for s in entry.scores.values())


def test_rank_layers_uses_a_given_loss_fn():
    calls = []

    def loss_fn(output, labels):
        calls.append(labels.shape)
        return nn.functional.cross_entropy(output, labels)

    trady_peft.rank_layers(_sequential(), _xy_loader(), steps=3, progress=False, loss_fn=loss_fn)
    assert len(calls) == 3


def test_rank_layers_refuses_batches_it_cannot_use_with_what_it_accepts():
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pair"):
        trady_peft.rank_layers(_sequential(), [(torch.randn(2, 6), torch.randn(2, 6), 1)], steps=1, progress=False)


def test_rank_layers_on_an_empty_dataloader_raises_instead_of_looping_forever():
    def timeout(*_):
        raise TimeoutError("rank_layers looped on an empty dataloader")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="empty dataloader"):
            trady_peft.rank_layers(_sequential(), DataLoader(TensorDataset(torch.empty(0, 6))), steps=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_rank_layers_command_with_an_xy_dataloader(tmp_path, capsys):
    factories = tmp_path / "factories.py"
    factories.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torch.utils.data import DataLoader, TensorDataset

            def model():
                return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

            def data():
                g = torch.Generator().manual_seed(0)
                x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
                return DataLoader(TensorDataset(x, y), batch_size=4)
            """
        )
    )
    out_json = tmp_path / "seq.json"
    code = main(
        ["rank-layers", "--model", f"{factories}:model", "--data", f"{factories}:data", "--steps", "4"]
        + ["--output", str(out_json)]
    )
    assert code == 0 and out_json.exists()
    assert "layers ranked" in capsys.readouterr().out


def test_budget_table_in_bytes_names_the_unit_of_every_column(capsys):
    from pathlib import Path

    spec = f"{Path(__file__).resolve().parent / 'tiny_models.py'}:tiny_cnn"
    assert main(["budget", "--model", spec, "--input-shape", "3,16,16", "--unit", "bytes", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    units = lines[1].split()
    assert units == ["(values)", "(values)", "(bytes)", "(bytes)"], lines[:2]
    assert any(line.startswith("weights + activations (bytes)") for line in lines)


def test_a_saved_adapters_card_says_import_trady_peft_is_needed(tmp_path):
    from peft import get_peft_model

    from tests.tiny_models import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(channels_per_layer=4))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again replaces the section, never repeats it
    card = (tmp_path / "README.md").read_text()
    assert "import trady_peft" in card and card.count("## TraDy adapter") == 1
    assert "library_name: peft" in card.split("---")[1] and "- trady" in card.split("---")[1]


def test_memory_command_titles_with_the_model_name_and_budget_and_explains_odd_figures(tmp_path, capsys):
    from pathlib import Path

    spec = f"{Path(__file__).resolve().parent / 'tiny_models.py'}:tiny_cnn"
    argv = ["memory", "--model", spec, "--input-shape", "3,16,16", "--batch-size", "4", "--budget", "300"]
    assert main([*argv, "--strategy", "d-full-random", "--modules-to-save", "classifier"]) == 0
    out = capsys.readouterr().out
    title = out.splitlines()[0]
    assert title.startswith("tiny_cnn: ") and "budget 300 units" in title and str(Path(spec).parent) not in title
    assert "LoRA's weights exceed full fine-tuning's" in out and "modules_to_save" in out


def test_the_readme_memory_block_is_the_output_of_its_own_command():
    import json
    import re
    import shlex
    from pathlib import Path

    import memory_report  # benchmarks/, on pytest's pythonpath

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "docs" / "memory" / "results.json").read_text())
    for doc in (root / "README.md", root / "docs" / "memory.md"):
        block = doc.read_text().split(memory_report.BEGIN)[1].split(memory_report.END)[0]
        command = re.search(r"```bash\ntrady-peft (.*?)\n```", block, re.S).group(1).replace("\\\n", " ")
        assert shlex.split(command) == memory_report.MBV2_COMMAND
        assert results["mbv2"]["printed"].rstrip() in block
        assert "mobilenet_v2_w035_10: " in block and "budget 27,946 units" in block


def test_pyproject_uses_an_spdx_license_and_ships_the_example_dependencies():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project["project"]["classifiers"])
    assert "setuptools>=77" in project["build-system"]["requires"]
    extra = " ".join(project["project"]["optional-dependencies"]["examples"])
    assert "datasets" in extra and "evaluate" in extra


def test_docstrings_use_markdown_not_sphinx_roles():
    import re
    from pathlib import Path

    package = Path(trady_peft.__file__).parent
    # Files another change owns; they still hold Sphinx roles (listed in the report).
    pending: set[str] = set()
    role = re.compile(r":(class|func|meth|attr|mod|data|obj|exc):`")
    offenders = [p.name for p in package.glob("*.py") if p.name not in pending and role.search(p.read_text())]
    assert not offenders


def test_example_progress_bars_name_the_method(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from transformers import Trainer, TrainingArguments

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    import offline_assets

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x, labels=None):
            logits = self.linear(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
        eval_strategy="steps", eval_steps=2, disable_tqdm=False, save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data, eval_dataset=data)
    offline_assets.with_method_label(trainer, "head only").train()
    err = capsys.readouterr().err
    assert "training: head only" in err and "evaluating: head only" in err
