"""How ``import trady_peft`` plugs TraDy into peft and transformers.

`install` (idempotent) registers the method with peft and applies, through the private-API
helpers of `trady_peft.compat`:

* atomic adapter saves (`trady_peft.files.atomic`);
* load errors that name the adapter file (`trady_peft.files.source`), and a refusal of TraDy
  tensors that another method's ``adapter_config.json`` left unused (`trady_peft.files.format`);
* the TraDy section of the adapter's model card (`trady_peft.hub`);
* a watchdog in every ``Trainer`` that warns when a dynamic strategy trains for epochs without
  `trady_peft.TraDyCallback` (`trady_peft.callback.PeriodWatchdog`).
"""

from __future__ import annotations

import functools

from . import compat
from .callback import PeriodWatchdog
from .config import NAME, TraDyConfig
from .files.atomic import atomic_save_file
from .files.format import PREFIX, check_tensors_loaded
from .files.source import naming_path, naming_source
from .hub import add_card_section
from .model import TraDyModel


def _with_card_section(create_or_update_model_card):
    def wrapped(self, output_dir: str):
        create_or_update_model_card(self, output_dir)
        add_card_section(self, output_dir)

    return wrapped


def _loading_adapter(load_adapter):
    """``PeftModel.load_adapter`` that names its file in errors and refuses TraDy tensors it left unused."""
    named = naming_source(load_adapter)

    @functools.wraps(load_adapter)
    def wrapped(self, model_id, adapter_name, *args, **kwargs):
        result = named(self, model_id, adapter_name, *args, **kwargs)
        config = self.peft_config.get(adapter_name)
        check_tensors_loaded(getattr(config, "peft_type", None), getattr(result, "unexpected_keys", ()), model_id)
        return result

    return wrapped


def install() -> None:
    """Register TraDy with peft and apply the patches above (idempotent)."""
    compat.register_method(NAME, TraDyConfig, TraDyModel, PREFIX)
    compat.replace_peft_save_file(atomic_save_file)
    compat.wrap_peft_load_file(naming_path)
    compat.wrap_peft_model_method("load_adapter", _loading_adapter)
    compat.wrap_peft_model_method("create_or_update_model_card", _with_card_section)
    compat.add_default_trainer_callback(PeriodWatchdog)
