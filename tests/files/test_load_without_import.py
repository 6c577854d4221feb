"""Loading a TraDy adapter needs `import trady_peft`: nothing a saved adapter carries can replace it.

peft 0.21 looks `peft_type` up in its registry before it reads anything else of adapter_config.json
(`PeftConfig.from_peft_type`, `PeftModel.from_pretrained`), and the file's `auto_mapping` (the
module of the base model's class) is imported only later, by `AutoPeftModel*`, and only from an
allowlist. The FAQ says so; this test holds peft to it, so a peft that learns to find the method
by itself shows up here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import get_peft_model

import trady_peft
from tests.tiny_models import tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]

LOAD = """
import sys, traceback
from peft import AutoPeftModel, PeftConfig, PeftModel
from tests.tiny_models import tiny_gpt2
for name, load in [
    ("PeftConfig", lambda: PeftConfig.from_pretrained(sys.argv[1])),
    ("PeftModel", lambda: PeftModel.from_pretrained(tiny_gpt2(), sys.argv[1])),
    ("AutoPeftModel", lambda: AutoPeftModel.from_pretrained(sys.argv[1])),
]:
    try:
        load()
        print(name, "loaded")
    except KeyError as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        print(name, repr(err), frame.filename.split("site-packages/")[-1], frame.name)
print("trady_peft imported:", "trady_peft" in sys.modules)
"""


def test_the_faq_says_why_no_adapter_file_can_replace_the_import():
    faq = " ".join((ROOT / "docs" / "faq.md").read_text().split())
    entry = faq.split("**`KeyError: 'TRADY'` when loading.**")[1].split("**")[0]
    assert "PEFT_TYPE_TO_CONFIG_MAPPING" in entry and "auto_mapping" in entry and "allowlist" in entry


@pytest.mark.slow  # a fresh interpreter that imports peft and transformers without trady_peft
def test_without_the_import_peft_cannot_find_the_method_whatever_the_adapter_says(tmp_path):
    model = get_peft_model(tiny_gpt2(), trady_peft.TraDyConfig(channels_per_layer=4))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["auto_mapping"] = {"base_model_class": "TraDyModel", "parent_library": "trady_peft"}
    config_file.write_text(json.dumps(config))

    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "PeftConfig KeyError('TRADY') peft/config.py from_peft_type"
    assert lines[1] == "PeftModel KeyError('TRADY') peft/peft_model.py from_pretrained"
    assert lines[2] == "AutoPeftModel KeyError('TRADY') peft/config.py from_peft_type"
    assert lines[3] == "trady_peft imported: False"
