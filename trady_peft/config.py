"""`TraDyConfig`: what to wrap, how much may be updated, and how channels are chosen."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ._registration import ensure_peft_type

STRATEGIES = ("trady", "s-top-k-random", "d-full-random", "s-full-random")


@dataclass
class TraDyConfig(PeftConfig):
    """Configuration of a TraDy adapter (Quélennec et al., ICLR 2026, arXiv 2510.19675).

    TraDy trains a few *input channels* of the target layers (a column of a Linear weight,
    ``W[:, c]`` of a convolution) and redraws them every period (epoch). Only the selected
    channels' inputs are kept for the backward pass, so activation memory shrinks with the
    weights that train.

    Example:
        ```python
        import trady_peft
        from peft import get_peft_model

        config = trady_peft.TraDyConfig(channels_per_layer=0.1, modules_to_save=["classifier"])
        model = get_peft_model(base_model, config)
        ```
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex (full match) of the layers TraDy may update. Supported: "
            "nn.Linear, nn.Conv1d, nn.Conv2d (incl. grouped/depthwise) and transformers' Conv1D. "
            "None: every supported layer except the output embedding and `modules_to_save`."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of layers never to wrap."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only wrap layers with these indices (see `layers_pattern`)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') for `layers_to_transform`."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter, e.g. the classifier head "
            "(the paper always trains the classifier)."
        },
    )
    channels_per_layer: int | float = field(
        default=0.1,
        metadata={
            "help": "How many input channels train in each target layer per period: an int (count) or a "
            "float in (0, 1] (fraction of the layer's input channels, at least one)."
        },
    )
    strategy: str = field(
        default="trady",
        metadata={
            "help": "Channel selection strategy: 'trady' (redraw uniformly every period), "
            f"'s-top-k-random' (draw once and keep). One of {STRATEGIES}."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the channel draws; the draw of period e depends only on (seed, e)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the delta starts at zero (the adapted model equals the base model). False: small "
            "random values, for tests."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, set, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} is only used together with layers_to_transform; "
                "set layers_to_transform too, or drop layers_pattern."
            )
        cpl = self.channels_per_layer
        if isinstance(cpl, bool) or not isinstance(cpl, (int, float)):
            raise ValueError(f"channels_per_layer={cpl!r} must be an int (a count) or a float in (0, 1] (a fraction).")
        if isinstance(cpl, float) and not 0.0 < cpl <= 1.0:
            raise ValueError(
                f"channels_per_layer={cpl!r} is a fraction and must lie in (0, 1]; pass an int for a count."
            )
        if isinstance(cpl, int) and cpl < 1:
            raise ValueError(f"channels_per_layer={cpl!r} must be at least 1 channel.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; choose one of {STRATEGIES}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int.")

    def channels_for(self, in_channels: int) -> int:
        """Number of channels drawn per period in a layer with ``in_channels`` input channels."""
        cpl = self.channels_per_layer
        k = max(1, round(cpl * in_channels)) if isinstance(cpl, float) else cpl
        return min(k, in_channels)

    @property
    def redraws(self) -> bool:
        """Whether the strategy draws new channels at every period (the D- strategies)."""
        return self.strategy in ("trady", "d-full-random")
