"""What the ``trady-peft`` commands do, once ``trady_peft_cli`` has read their arguments.

``trady-peft budget`` prints the per-layer memory accounting of a model (what one input channel
of each layer costs in weights and activations, and the totals), so a budget can be chosen
before training; ``memory`` measures one training step three ways; ``rank-layers`` writes an
importance table entry. The parser lives in ``trady_peft_cli`` (outside this package, so that
``--help`` imports no torch); ``build_parser`` and ``main`` are the same functions here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from trady_peft_cli import build_parser, main  # noqa: F401  (the parser, importable from here too)

from .memory.budget import memory_accounting


def resolve_factory(spec: str, flag: str):
    """The callable named by ``file.py:factory`` or ``package.module:factory``."""
    target, _, factory = spec.rpartition(":")
    if not target or not factory:
        raise SystemExit(f"{flag} {spec!r} must be 'file.py:factory' or 'module:factory'.")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise SystemExit(f"{flag} {spec!r}: file {target!r} does not exist.")
        sys.path.insert(0, str(path.parent.resolve()))
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, factory):
        raise SystemExit(f"{flag} {spec!r}: {target!r} has no {factory!r}.")
    return getattr(module, factory)


def load_model(spec: str) -> nn.Module:
    """Build a model from ``file.py:factory``, ``package.module:factory``, or a Hugging Face id/path."""
    if ":" in spec and not Path(spec).exists():
        return resolve_factory(spec, "--model")()
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(spec)
    except OSError as err:
        raise SystemExit(
            f"--model {spec!r} is neither 'file.py:factory', 'module:factory' nor a loadable Hugging Face "
            f"model ({err.__class__.__name__}). Example: --model benchmarks/paper_models.py:mobilenet_v2_w035"
        ) from None


def example_inputs(model: nn.Module, shape: list[int], batch_size: int, with_labels: bool = False):
    """A batch of ``[batch_size, *shape]``: random token ids for a text model (with labels for a
    real loss when asked), random floats otherwise."""
    g = torch.Generator().manual_seed(0)
    if getattr(model, "main_input_name", None) == "input_ids":
        vocab = getattr(getattr(model, "config", None), "vocab_size", 100)
        ids = torch.randint(0, vocab, (batch_size, *shape), generator=g)
        batch = {"input_ids": ids}
        kind = type(model).__name__
        if with_labels and kind.endswith("ForCausalLM"):
            batch["labels"] = ids
        elif with_labels and kind.endswith("ForSequenceClassification"):
            batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
        return batch
    return torch.randn(batch_size, *shape, generator=g)


def cmd_budget(args) -> int:
    model = load_model(args.model).eval()
    targets = None
    if args.convs_only:
        targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    inputs = example_inputs(model, args.input_shape, args.batch_size)
    try:
        acc = memory_accounting(
            model, inputs, unit=args.unit, target_modules=targets, optimizer_state_bytes=args.optimizer_state_bytes
        )
    except RuntimeError as err:
        raise SystemExit(
            f"The model did not run on inputs of shape {[args.batch_size, *args.input_shape]}: {err}. "
            "Check --input-shape (one sample, without the batch dimension)."
        ) from None
    print(acc.table())
    return 0


def model_name(spec: str) -> str:
    """A short name for ``--model``: the factory's name, or the last part of a Hugging Face id/path."""
    if ":" in spec and not Path(spec).exists():
        return spec.rpartition(":")[2]
    return Path(spec.rstrip("/")).name or spec


def describe_budget(budget: int | str | None, channels_per_layer: float | None) -> str:
    if budget is None and channels_per_layer is None:
        return "default budget (a bank of LoRA r=8's values)"
    if budget is None:
        return f"no budget, {channels_per_layer:g} of each layer's input channels"
    if isinstance(budget, int):
        return f"budget {budget:,} units (values per sample, the paper's)"
    return f"budget {budget}"


def memory_report(args):
    """The `MemoryReport` of ``trady-peft memory`` (parsed ``args``)."""
    from .config import TraDyConfig
    from .report import compare_memory

    probe_model = load_model(args.model)
    inputs = example_inputs(probe_model, args.input_shape, args.batch_size, with_labels=True)
    del probe_model
    try:
        config = TraDyConfig(
            memory_budget=args.budget,
            channels_per_layer=None if args.budget is not None else args.channels_per_layer,
            strategy=args.strategy,
            modules_to_save=args.modules_to_save,
            target_modules=args.target_modules,
            max_depth=args.max_depth,
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None
    shape = "x".join(str(d) for d in args.input_shape)
    desc = (
        f"{model_name(args.model)}: input {shape}, batch {args.batch_size}, "
        f"{describe_budget(args.budget, args.channels_per_layer)}, {args.strategy}, {args.optimizer}; "
        "one training step, measured"
    )
    if args.max_depth is not None:
        desc = desc.replace("; one training step", f", max_depth {args.max_depth}; one training step")
    return compare_memory(
        lambda: load_model(args.model),
        inputs,
        config,
        lora_r=args.lora_r,
        optimizer=args.optimizer,
        description=desc,
        frozen_path_split=not args.no_frozen_path_split,
    )


def cmd_memory(args) -> int:
    report = memory_report(args)
    print(report.table())
    if args.png:
        print(f"bar chart: {report.plot(args.png)}")
    return 0


def cmd_rank_layers(args) -> int:
    from .selection.importance import rank_layers, top_k_for

    model = load_model(args.model)
    loader = resolve_factory(args.data, "--data")()
    entry = rank_layers(
        model,
        loader,
        steps=args.steps,
        metric=args.metric,
        lr=args.lr,
        family=args.family,
        exclude_modules=args.exclude or (),
        provenance={"model_spec": args.model, "data": args.data},
    )
    path = entry.save(args.output or f"{entry.family}.json")
    ranking = entry.ranking
    print(f"{entry.family}: {len(ranking)} layers ranked by cumulative {entry.metric.upper()} over {args.steps} steps")
    print(f"top-K (97% of the total): {entry.top_k}; half of the total in the top {top_k_for(entry.scores, 0.5)}")
    for i, name in enumerate(ranking[: min(10, len(ranking))], start=1):
        print(f"{i:>3}. {name:<60}{entry.scores[name]:.4g}")
    print(f"written to {path}; use it with TraDyConfig(layer_ranking={str(path)!r})")
    return 0


#: The function that runs each sub-command of ``trady_peft_cli.build_parser``, by name.
COMMANDS = {"budget": cmd_budget, "memory": cmd_memory, "rank-layers": cmd_rank_layers}

if __name__ == "__main__":
    raise SystemExit(main())
