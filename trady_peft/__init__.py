"""trady-peft: TraDy (ICLR 2026) as a PEFT method for memory-constrained fine-tuning.

``import trady_peft`` registers the method with peft, after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the ``AutoPeftModel*`` classes
accept TraDy adapters.
"""

from . import compat as _compat
from ._registration import register as _register
from .budget import Accounting, Budget, LayerCost, memory_accounting, parse_budget
from .callback import TraDyCallback, next_period
from .config import TraDyConfig
from .distributed import fsdp_ignored_modules, fsdp_ignored_params
from .export import export_lora
from .hub import push_to_hub
from .importance import ImportanceEntry, rank_layers
from .layer import QuantizedMergeWarning, TraDyLayer
from .memory import TrainingStepMemory, measure_training_step
from .model import TraDyModel, find_tuner

__version__ = "0.1.0"

_register()
_compat.install()  # atomic saves, load errors naming the file, the adapter card (trady_peft/compat.py)

__all__ = [
    "Accounting",
    "Budget",
    "export_lora",
    "find_tuner",
    "fsdp_ignored_modules",
    "fsdp_ignored_params",
    "ImportanceEntry",
    "LayerCost",
    "memory_accounting",
    "next_period",
    "parse_budget",
    "push_to_hub",
    "QuantizedMergeWarning",
    "rank_layers",
    "TraDyCallback",
    "TraDyConfig",
    "TraDyLayer",
    "TraDyModel",
    "TrainingStepMemory",
    "measure_training_step",
    "__version__",
]
