"""Adds TraDy to peft's registry of methods.

peft has no plugin hook: ``register_peft_method`` only accepts names that are already members
of the ``PeftType`` enum. We add a ``TRADY`` member with a recipe that works on Python 3.10-3.13
(3.12 removed ``EnumType.__getattr__``; 3.13 stopped appending to ``_member_names_``), then
register the config and tuner classes. Both steps are idempotent, so importing twice or
``importlib.reload`` is safe.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "trady"
PREFIX = "trady_"


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.TRADY``, adding the member to peft's enum the first time."""
    member = PeftType._value2member_map_.get("TRADY")
    if member is not None:
        return member
    member = str.__new__(PeftType, "TRADY")
    member._name_ = "TRADY"
    member._value_ = "TRADY"
    type.__setattr__(PeftType, "TRADY", member)
    PeftType._member_map_["TRADY"] = member
    PeftType._value2member_map_["TRADY"] = member
    if "TRADY" not in PeftType._member_names_:
        PeftType._member_names_.append("TRADY")
    return member


def register() -> None:
    """Register TraDy with peft (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel*``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import TraDyConfig
    from .model import TraDyModel

    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is TraDyConfig:
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        # A reload created new classes: point peft at them.
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = TraDyConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = TraDyModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return
    register_peft_method(name=NAME, config_cls=TraDyConfig, model_cls=TraDyModel, prefix=PREFIX)
