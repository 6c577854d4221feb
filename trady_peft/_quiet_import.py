"""Keeps the quantization backends' import-time log lines out of ``import trady_peft``.

When bitsandbytes and torchao are installed (the ``dev`` extra installs them for the tests on
quantized bases), the first ``import peft`` imports both (``peft.helpers`` imports bitsandbytes,
``transformers.quantizers.auto`` imports torchao), and on a CPU machine they log, through the
standard ``logging`` module at level WARNING (no ``warnings.warn``, no print), every time:

* the ``torchao`` logger: ``Failed to load .../torchao/_C_mxfp8...so`` and ``..._C_cutlass_90a.abi3.so``
  (compiled kernels this torch cannot load);
* the ``torch.utils._pytree`` logger: twice ``<enum ...> is an Enum subclass ... register_constant()
  on Enum subclasses is deprecated``, when torchao registers two enums with torch;
* the ``bitsandbytes.backends.cpu.ops`` logger: ``Failed to load CPU gemm_4bit_forward from
  kernels-community ...`` (an optional kernel from the Hugging Face hub that the ``kernels``
  package refuses without ``trust_remote_code``).

While peft is imported the first time, these loggers pass only ERROR and above; afterwards each
gets back the level it had, so their later messages, and every warning of trady_peft and of the
caller's code, still show. Without the backends installed nothing is logged and this does nothing
visible.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: The loggers that speak while the quantization backends are imported (see above).
BACKEND_IMPORT_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_backend_import() -> Iterator[None]:
    """Within the block, ``BACKEND_IMPORT_LOGGERS`` log ERROR and above only."""
    loggers = [logging.getLogger(name) for name in BACKEND_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            if logger.level == logging.ERROR:  # a level the import itself set is kept
                logger.setLevel(level)
