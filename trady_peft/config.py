"""`TraDyConfig`: what to wrap, how much may be updated, and how channels are chosen."""

from __future__ import annotations

import difflib
import numbers
import os
import re
import reprlib
import warnings
from dataclasses import dataclass, field

from peft.config import PeftConfig

from .compat import ensure_peft_type
from .memory.budget import parse_budget, parse_step_memory
from .selection.draws import MAX_SEED, PERIOD_STRIDE
from .selection.importance import ImportanceEntry
from .selection.strategies import AUTO, DYNAMIC_STRATEGIES, SCORING_STRATEGIES, STRATEGIES, TOP_K_STRATEGIES

#: The method's name in peft's registry (``PeftType.TRADY``).
NAME = "trady"


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
            "help": "The adapter's memory allowance, in one of two units. An int is in the paper's units: values per "
            "sample of the selected channels' weights and their slice of the layer inputs (e.g. 27946). A string "
            "with a unit is in bytes ('256KiB', '2MB', '1500000B'; case-sensitive, a lowercase 'b' is refused as "
            "bits), counted for the real batch and dtype. A byte budget bounds everything the adapter adds to a "
            "training step: the bank parameter that holds the selected channels' trainable values, its gradient, "
            "its optimizer state, and the saved inputs of the selected channels. Costs come from a shape probe on "
            "the first forward pass (or `model.base_model.probe(inputs)`)."
        },
    )
    step_memory: str | None = field(
        default=None,
        metadata={
            "help": "Instead of memory_budget: a bound on the whole training step, in bytes with a unit ('6GiB', "
            "'512MB'). The step counts the model's parameters and buffers resident on the device (frozen weights "
            "included, so that the bound compares with torch.cuda.max_memory_allocated), the activations saved for "
            "backward, the gradient and optimizer state of every trainable tensor (modules_to_save heads included) "
            "and the adapter. The probe measures all but the adapter for the largest input seen, and the adapter "
            "gets what remains as a byte budget (redrawn smaller when a larger input arrives). Transient memory "
            "(the output, gradients in flight, kernel workspaces) is not counted."
        },
    )
    channels_per_layer: int | float | None = field(
        default=None,
        metadata={
            "help": "Instead of a memory budget: how many input channels train in each target layer per period, "
            "an int (count) or a float in (0, 1] (fraction). None, with no memory_budget or step_memory: a default "
            "byte budget whose bank holds as many trainable values as LoRA r=8 would train on the same layers, and "
            "as many bytes again for the selected channels' saved inputs (written into memory_budget when the "
            "adapter is created)."
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
    max_depth: int | None = field(
        default=None,
        metadata={
            "help": "Only the `max_depth` blocks nearest the output may be drawn from (a block: the target layers "
            "sharing the part of their name up to the first number, e.g. `model.layers.4`; a layer without a "
            "number is a block of its own). Backprop stops at the lowest trained layer, so a smaller depth keeps "
            "less of the frozen path for backward, at the price of drawing from fewer, possibly less important, "
            "layers. None: every candidate layer."
        },
    )
    gradient_batches: int = field(
        default=8,
        metadata={"help": "Batches the Det-RGN strategies score channels on (full-gradient norms) at each selection."},
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
            "help": "Byte budgets only (memory_budget in bytes, or the adapter's share of step_memory): the share "
            "given to the trainable bank (parameter, gradient and optimizer state of the selected channels' weights, "
            "a fixed cost for the whole run); the rest bounds the saved inputs of the selected channels. The "
            "per-period summary suggests a better share when one part stays unused."
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
        default="auto",
        metadata={
            "help": "Channel selection strategy: 'auto' (the default: 'medyate' for a causal language model under a "
            "budget (memory_budget, step_memory or the default budget), 'trady' otherwise (channels_per_layer, or "
            "another model); picked when the adapter is created and written into this config), "
            "'trady' (uniform inside the top-K layers, redrawn every period), "
            "'s-top-k-random' (the same, drawn once), 'd-full-random' / 's-full-random' (uniform over every "
            "target layer), 'd-det-rgn' / 's-det-rgn' (greedy by reweighted gradient norm of the full gradient, "
            "scored chunk by chunk within the budget), 'medyate' (top-K layers with K from the "
            "budget, channels drawn in proportion to their last-seen gradient norm). One of "
            f"{('auto', *STRATEGIES)}. All but 'auto' and the random ones need a budget, not channels_per_layer."
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
        self.target_modules = _names("target_modules", self.target_modules, allow_empty=False)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules, allow_empty=True)
        self._check_layers_to_transform()
        self._check_layers_pattern()
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} is only used together with layers_to_transform; "
                "set layers_to_transform too, or drop layers_pattern."
            )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(
                    f"modules_to_save={self.modules_to_save!r} must be a list of module names, e.g. "
                    f"modules_to_save=[{self.modules_to_save!r}]."
                    if isinstance(self.modules_to_save, str)
                    else f"modules_to_save={self.modules_to_save!r} must be a list of module names (strings)."
                )
            self.modules_to_save = list(self.modules_to_save)
        if self.step_memory is not None:
            if self.memory_budget is not None:
                raise ValueError(
                    f"Set either step_memory={self.step_memory!r} (the whole training step) or memory_budget="
                    f"{self.memory_budget!r} (what the adapter adds), not both: drop memory_budget to bound the step."
                )
            if self.channels_per_layer is not None:
                raise ValueError(
                    f"Set either step_memory={self.step_memory!r} or channels_per_layer={self.channels_per_layer!r}, "
                    "not both."
                )
            parse_step_memory(self.step_memory)  # raises a clear error for a bad value
        elif self.memory_budget is not None:
            if self.channels_per_layer is not None:
                raise ValueError(
                    f"Set either memory_budget={self.memory_budget!r} or channels_per_layer="
                    f"{self.channels_per_layer!r}, not both."
                )
            budget = parse_budget(self.memory_budget)  # raises a clear error for a bad value
            if budget.unit == "values":
                self.memory_budget = budget.amount  # a plain int, e.g. from numpy.int64: JSON-serialisable
        self._check_channels_per_layer()
        if self.top_k is not None:
            self.top_k = _integer("top_k", self.top_k, 1, "a positive int (number of ranked layers), or None")
        if self.max_depth is not None:
            self.max_depth = _integer(
                "max_depth",
                self.max_depth,
                1,
                "a positive int (the number of blocks nearest the output TraDy may draw from), or None for all",
            )
        if isinstance(self.layer_ranking, (str, os.PathLike)):
            self._load_ranking_file(os.fspath(self.layer_ranking))
        elif self.layer_ranking is not None:
            self._check_layer_ranking()
        self.optimizer_state_bytes = _integer(
            "optimizer_state_bytes",
            self.optimizer_state_bytes,
            0,
            "an int >= 0 (8 for Adam/AdamW, 4 for SGD with momentum, 0 for plain SGD)",
        )
        if not isinstance(self.strategy, str) or self.strategy not in (AUTO, *STRATEGIES):
            choices = (AUTO, *STRATEGIES)
            close = difflib.get_close_matches(str(self.strategy).lower(), list(choices), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(f"strategy={self.strategy!r} is unknown{hint} Choose one of {choices}.")
        if self.strategy in (*SCORING_STRATEGIES, "medyate") and self.channels_per_layer is not None:
            raise ValueError(
                f"strategy={self.strategy!r} selects channels under a budget, not channels_per_layer="
                f"{self.channels_per_layer!r}: drop channels_per_layer for the default budget, or set memory_budget "
                "(or step_memory) instead."
            )
        if self.strategy not in (AUTO, *TOP_K_STRATEGIES) and (
            self.layer_ranking is not None or self.top_k is not None
        ):
            warnings.warn(
                f"strategy={self.strategy!r} does not use layer_ranking or top_k (only {TOP_K_STRATEGIES} do): "
                "they are ignored. Drop them, or pick a top-K strategy.",
                UserWarning,
                stacklevel=3,
            )
        self.gradient_batches = _integer("gradient_batches", self.gradient_batches, 1, "a positive int")
        alpha = self.medyate_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha <= 1:
            raise ValueError(f"medyate_alpha={alpha!r} must be a number in (0, 1]; the paper uses 0.2.")
        self.medyate_alpha = float(alpha)
        share = self.bank_share
        if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0.0 < share < 1.0:
            raise ValueError(
                f"bank_share={share!r} must lie strictly between 0 and 1 (the share of a byte budget for the "
                "trainable bank; the rest bounds the saved inputs). The default is 0.5."
            )
        self.bank_share = float(share)
        self.seed = _integer("seed", self.seed, 0, f"an int between 0 and {MAX_SEED:,}")
        if self.seed > MAX_SEED:
            raise ValueError(
                f"seed={self.seed!r} is too large: the draw of period p seeds a torch generator with "
                f"seed * {PERIOD_STRIDE:_} + p, which must fit in 64 bits; pass a seed between 0 and {MAX_SEED:,}."
            )
        for flag in ("memory_saving_frozen_path", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False.")

    def _check_layers_to_transform(self) -> None:
        value = self.layers_to_transform
        if value is None:
            return
        items = [value] if not isinstance(value, (list, tuple)) else value
        if not items or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in items):
            raise ValueError(
                f"layers_to_transform={value!r} must be a layer index >= 0 or a non-empty list of them, "
                "e.g. layers_to_transform=[0, 1]."
            )
        self.layers_to_transform = int(value) if not isinstance(value, (list, tuple)) else [int(i) for i in value]

    def _check_layers_pattern(self) -> None:
        value = self.layers_pattern
        if value is None:
            return
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) and p for p in items):
            raise ValueError(
                f"layers_pattern={value!r} must be the name of the model's layer list, e.g. layers_pattern='layers' "
                "(Llama) or 'h' (GPT-2), or a list of such names."
            )
        self.layers_pattern = value if isinstance(value, str) else list(value)

    def _check_channels_per_layer(self) -> None:
        cpl = self.channels_per_layer
        if cpl is None:
            return
        if isinstance(cpl, bool) or not isinstance(cpl, numbers.Real):
            raise ValueError(f"channels_per_layer={cpl!r} must be an int (a count) or a float in (0, 1] (a fraction).")
        if isinstance(cpl, numbers.Integral):
            if cpl < 1:
                raise ValueError(f"channels_per_layer={cpl!r} must be at least 1 channel, or a fraction in (0, 1].")
            self.channels_per_layer = int(cpl)
            return
        if not 0.0 < cpl <= 1.0:
            raise ValueError(
                f"channels_per_layer={cpl!r} is a fraction and must lie in (0, 1]; pass an int for a count."
            )
        self.channels_per_layer = float(cpl)

    def _check_layer_ranking(self) -> None:
        ranking = self.layer_ranking
        if isinstance(ranking, (set, frozenset)) or not isinstance(ranking, (list, tuple)):
            raise ValueError(
                f"layer_ranking={ranking!r} must be an ordered list of layer names (most important first) or the "
                "path of a ranking file from `trady-peft rank-layers`."
            )
        bad = [n for n in ranking if not isinstance(n, str) or not n]
        if bad:
            raise ValueError(
                f"layer_ranking={reprlib.repr(ranking)} holds {bad[0]!r}, which is not a layer name: pass a list of "
                "names (most important first) or the path of a ranking file."
            )
        if not ranking:
            raise ValueError(
                "layer_ranking=[] ranks no layer: pass None to use the built-in table (or every target layer), or "
                "a list of layer names."
            )
        seen, repeated = set(), []
        for n in ranking:
            if n in seen:
                repeated.append(n)
            seen.add(n)
        if repeated:
            raise ValueError(
                f"layer_ranking={reprlib.repr(ranking)} names {repeated[0]!r} twice: each layer must appear once."
            )
        self.layer_ranking = list(ranking)
        if self.top_k is not None and self.top_k > len(ranking):
            raise ValueError(
                f"top_k={self.top_k} exceeds the {len(ranking)} layers of layer_ranking: pass top_k <= "
                f"{len(ranking)}, or None to use every ranked layer."
            )

    def _load_ranking_file(self, path: str) -> None:
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
        """Number of channels drawn per period in a layer with ``in_channels`` input channels.

        A count above the layer's width is clamped to the width, with a warning (once per value of
        ``channels_per_layer``, naming the first narrower layer's width).
        """
        cpl = self.channels_per_layer
        k = max(1, round(cpl * in_channels)) if isinstance(cpl, float) else cpl
        if k > in_channels:
            warned = self.__dict__.setdefault("_trady_clamp_warned", set())
            if cpl not in warned:
                warned.add(cpl)
                warnings.warn(
                    f"channels_per_layer={cpl} exceeds a target layer's {in_channels} input channels: such layers "
                    "train all their channels. Lower channels_per_layer, or pass a fraction (e.g. 0.5) to scale "
                    "with each layer's width.",
                    UserWarning,
                    stacklevel=2,
                )
        return min(k, in_channels)

    @property
    def redraws(self) -> bool:
        """Whether the strategy draws new channels at every period (the D- strategies)."""
        return self.strategy in (AUTO, *DYNAMIC_STRATEGIES)  # 'auto' picks a dynamic one

    @property
    def budget(self):
        """The parsed memory_budget (a `trady_peft.memory.budget.Budget`), or None."""
        return None if self.memory_budget is None else parse_budget(self.memory_budget)

    @property
    def step_budget(self):
        """The parsed step_memory (a `trady_peft.memory.budget.Budget` in bytes), or None."""
        return None if self.step_memory is None else parse_step_memory(self.step_memory)

    @property
    def uses_default_budget(self) -> bool:
        """Whether none of memory_budget, step_memory and channels_per_layer is set: the adapter then gets
        `trady_peft.memory.budget.default_budget`, written into memory_budget when it is created."""
        return self.memory_budget is None and self.step_memory is None and self.channels_per_layer is None

    @property
    def budgeted(self) -> bool:
        """Whether channels are drawn under a budget (memory_budget or step_memory), not by count."""
        return self.memory_budget is not None or self.step_memory is not None


def _integer(name: str, value, minimum: int, what: str) -> int:
    """``value`` as a plain int (any integer type but bool), at least ``minimum``, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} must be {what}.")
    return int(value)


def _names(name: str, value, *, allow_empty: bool):
    """``target_modules`` / ``exclude_modules``: None, a regex string or a collection of names (a set)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value and not allow_empty:
            raise ValueError(f"{name}='' matches no layer: pass None to wrap every supported layer, or names.")
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression ({err}): pass a list of layer names, e.g. "
                f"{name}=['q_proj', 'v_proj'], or a valid regex, e.g. {name}=r'.*\\.(q_proj|v_proj)'."
            ) from None
        return value
    if not isinstance(value, (list, set, tuple, frozenset)) or not all(isinstance(n, str) for n in value):
        raise ValueError(
            f"{name}={value!r} must be a list of layer names (suffix match), a regex string, or None, "
            "e.g. ['q_proj', 'v_proj']."
        )
    if not value and not allow_empty:
        raise ValueError(f"{name}={value!r} selects no layer: pass None to wrap every supported layer, or names.")
    return set(value)
