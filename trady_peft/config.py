"""`TraDyConfig`: what to wrap, how much may be updated, and how channels are chosen."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ._registration import ensure_peft_type
from .budget import parse_budget
from .strategies import STRATEGIES as _STRATEGIES

#: Selection strategies, by the paper's names (TraDy §4, MeDyate §4); see trady_peft.strategies.
#: "d-" redraws every period, "s-" draws once.
STRATEGIES = tuple(_STRATEGIES)
DYNAMIC_STRATEGIES = tuple(n for n, s in _STRATEGIES.items() if s.redraws)
#: Strategies that draw inside a layer ranking (the importance table when none is given).
TOP_K_STRATEGIES = tuple(n for n, s in _STRATEGIES.items() if s.layers != "all")
#: Strategies that need the full gradient of every candidate channel (memory-infeasible oracles).
ORACLE_STRATEGIES = tuple(n for n, s in _STRATEGIES.items() if s.needs_scores)


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
    memory_budget: int | str | None = field(
        default=None,
        metadata={
            "help": "Memory the selected channels may use per period: weights + input activations. An int is in "
            "the paper's units (scalar values per sample, e.g. 27946); a string with a unit is in bytes "
            "('256KiB', '2MB', '1500000B'), counted for the real batch and dtype. Costs come from a shape probe "
            "on the first forward pass (or `model.base_model.probe(inputs)`)."
        },
    )
    channels_per_layer: int | float | None = field(
        default=None,
        metadata={
            "help": "Instead of a memory budget: how many input channels train in each target layer per period, "
            "an int (count) or a float in (0, 1] (fraction). Default when no memory_budget is set: 0.1."
        },
    )
    layer_ranking: list[str] | None = field(
        default=None,
        metadata={
            "help": "Target layers ordered from most to least important (names or suffixes), or the path of a "
            "ranking file from `trady-peft rank-layers`. The top-K strategies draw inside its first `top_k` "
            "layers. None: the built-in importance table of the model's family if there is one, else every "
            "target layer."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "How many layers of `layer_ranking` the top-K strategies use. None: all ranked layers."},
    )
    gradient_batches: int = field(
        default=8,
        metadata={"help": "Batches of full gradient the Det-RGN oracles score channels on at each selection."},
    )
    medyate_alpha: float = field(
        default=0.2,
        metadata={
            "help": "MeDyate: K is the smallest number of ranked layers whose total memory M_K satisfies "
            "budget / M_K <= medyate_alpha (the paper's alpha_opt = 0.2)."
        },
    )
    bank_share: float = field(
        default=0.5,
        metadata={
            "help": "Byte budgets only: the share of `memory_budget` given to the trainable bank (parameter, "
            "gradient and optimizer state of the selected channels' weights, a fixed cost for the whole run); the "
            "rest bounds the saved inputs of the selected channels. The per-period summary suggests a better share "
            "when one part stays unused."
        },
    )
    optimizer_state_bytes: int = field(
        default=8,
        metadata={
            "help": "Optimizer state per trained value, counted in byte budgets: 8 for Adam/AdamW, 4 for SGD "
            "with momentum, 0 for plain SGD (the paper's setting)."
        },
    )
    strategy: str = field(
        default="trady",
        metadata={
            "help": "Channel selection strategy: 'trady' (uniform inside the top-K layers, redrawn every period), "
            "'s-top-k-random' (the same, drawn once), 'd-full-random' / 's-full-random' (uniform over every "
            "target layer), 'd-det-rgn' / 's-det-rgn' (greedy by reweighted gradient norm of the full gradient: "
            "an oracle that needs memory the budget does not allow), 'medyate' (top-K layers with K from the "
            "budget, channels drawn in proportion to their last-seen gradient norm). One of "
            f"{STRATEGIES}. All but the random ones need memory_budget."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the channel draws; the draw of period e depends only on (seed, e)."},
    )
    memory_saving_frozen_path: bool = field(
        default=True,
        metadata={
            "help": "Swap frozen convolutions, batch norms and ReLU-family activations for twins that keep only "
            "what the backward pass needs (no conv input, no batch-norm input, a 1-bit ReLU mask). Batch norms "
            "then use their running statistics in training too (frozen, as when fused on a device)."
        },
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
        if self.memory_budget is not None:
            if self.channels_per_layer is not None:
                raise ValueError(
                    f"Set either memory_budget={self.memory_budget!r} or channels_per_layer="
                    f"{self.channels_per_layer!r}, not both."
                )
            parse_budget(self.memory_budget)  # raises a clear error for a bad value
        elif self.channels_per_layer is None:
            self.channels_per_layer = 0.1
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k={self.top_k!r} must be a positive int (number of ranked layers), or None.")
        if isinstance(self.layer_ranking, str):
            self._load_ranking_file(self.layer_ranking)
        elif self.layer_ranking is not None:
            if not all(isinstance(n, str) for n in self.layer_ranking):
                raise ValueError(
                    "layer_ranking must be a list of layer names (most important first) or a ranking file."
                )
            self.layer_ranking = list(self.layer_ranking)
        if (
            isinstance(self.optimizer_state_bytes, bool)
            or not isinstance(self.optimizer_state_bytes, int)
            or (self.optimizer_state_bytes < 0)
        ):
            raise ValueError(f"optimizer_state_bytes={self.optimizer_state_bytes!r} must be an int >= 0.")
        cpl = self.channels_per_layer
        if cpl is None:
            pass
        elif isinstance(cpl, bool) or not isinstance(cpl, (int, float)):
            raise ValueError(f"channels_per_layer={cpl!r} must be an int (a count) or a float in (0, 1] (a fraction).")
        if isinstance(cpl, float) and not 0.0 < cpl <= 1.0:
            raise ValueError(
                f"channels_per_layer={cpl!r} is a fraction and must lie in (0, 1]; pass an int for a count."
            )
        if isinstance(cpl, int) and cpl < 1:
            raise ValueError(f"channels_per_layer={cpl!r} must be at least 1 channel.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; choose one of {STRATEGIES}.")
        if self.strategy in (*ORACLE_STRATEGIES, "medyate") and self.memory_budget is None:
            raise ValueError(f"strategy={self.strategy!r} selects channels under a budget: set memory_budget too.")
        if (
            isinstance(self.gradient_batches, bool)
            or not isinstance(self.gradient_batches, int)
            or (self.gradient_batches < 1)
        ):
            raise ValueError(f"gradient_batches={self.gradient_batches!r} must be a positive int.")
        if not isinstance(self.medyate_alpha, (int, float)) or not 0 < self.medyate_alpha <= 1:
            raise ValueError(f"medyate_alpha={self.medyate_alpha!r} must lie in (0, 1]; the paper uses 0.2.")
        if (
            isinstance(self.bank_share, bool)
            or not isinstance(self.bank_share, (int, float))
            or not (0.0 < self.bank_share < 1.0)
        ):
            raise ValueError(
                f"bank_share={self.bank_share!r} must lie strictly between 0 and 1 (the share of a byte budget "
                "for the trainable bank; the rest bounds the saved inputs). The default is 0.5."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int.")

    def _load_ranking_file(self, path: str) -> None:
        from .importance import ImportanceEntry

        try:
            entry = ImportanceEntry.load(path)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"layer_ranking={path!r} is not a readable ranking file ({err}); pass a list of layer names or the "
                "JSON written by `trady-peft rank-layers`."
            ) from None
        self.layer_ranking = entry.ranking
        if self.top_k is None:
            self.top_k = entry.top_k

    def channels_for(self, in_channels: int) -> int:
        """Number of channels drawn per period in a layer with ``in_channels`` input channels."""
        cpl = self.channels_per_layer
        k = max(1, round(cpl * in_channels)) if isinstance(cpl, float) else cpl
        return min(k, in_channels)

    @property
    def redraws(self) -> bool:
        """Whether the strategy draws new channels at every period (the D- strategies)."""
        return self.strategy in DYNAMIC_STRATEGIES

    @property
    def budget(self):
        """The parsed :class:`~trady_peft.budget.Budget`, or None when channels_per_layer is used."""
        return None if self.memory_budget is None else parse_budget(self.memory_budget)
