"""trady-peft: TraDy (ICLR 2026) as a PEFT method for memory-constrained fine-tuning.

``import trady_peft`` registers the method with peft, after which ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the ``AutoPeftModel*`` classes
accept TraDy adapters.
"""

from ._quiet_import import quiet_backend_import as _quiet_backend_import

with _quiet_backend_import():  # peft loads bitsandbytes and torchao when installed; they log on import
    import peft  # noqa: F401

from . import _patches
from .callback import TraDyCallback, next_period
from .config import TraDyConfig
from .core.distributed import fsdp_ignored_modules, fsdp_ignored_params
from .core.layer import QuantizedMergeWarning, TraDyLayer
from .export import export_lora
from .files.format import AdapterFileError
from .hub import push_to_hub
from .memory.budget import Accounting, memory_accounting
from .memory.measure import TrainingStepMemory, measure_training_step
from .model import TraDyModel, find_tuner
from .recommend import create_optimizer, recommended_learning_rate
from .report import MemoryReport, compare_memory
from .selection.importance import ImportanceEntry, rank_layers

__version__ = "0.1.0"

_patches.install()  # registers the method with peft; atomic saves, load errors naming the file, the card

__all__ = [
    "Accounting",
    "AdapterFileError",
    "export_lora",
    "find_tuner",
    "fsdp_ignored_modules",
    "fsdp_ignored_params",
    "compare_memory",
    "create_optimizer",
    "MemoryReport",
    "ImportanceEntry",
    "memory_accounting",
    "next_period",
    "push_to_hub",
    "QuantizedMergeWarning",
    "rank_layers",
    "recommended_learning_rate",
    "TraDyCallback",
    "TraDyConfig",
    "TraDyLayer",
    "TraDyModel",
    "TrainingStepMemory",
    "measure_training_step",
    "__version__",
]
