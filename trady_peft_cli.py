"""The ``trady-peft`` command line: its arguments, read without importing torch.

The console script points here, outside the ``trady_peft`` package, because importing the package
registers TraDy with peft and so loads torch, transformers and peft (seconds). ``trady-peft --help``
and argument errors answer from this module alone; a command's work runs in ``trady_peft.cli``,
imported once the arguments are read.

Commands: ``budget`` (what one input channel of each layer costs, to choose a budget), ``memory``
(one measured training step, TraDy vs LoRA vs full fine-tuning) and ``rank-layers`` (an importance
table entry for a new model).
"""

from __future__ import annotations

import argparse


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with "(default: ...)", except for required options, flags and None defaults
    (whose help says what None does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


FORMATTER = _ShowDefaults


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 3,128,128 or 128") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 3,128,128 or 128")
    return dims


def _budget(text: str) -> int | str:
    from trady_peft.memory.budget import parse_budget  # only when --budget is given: a command follows

    budget = int(text) if text.isdigit() else text
    try:
        parse_budget(budget)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return budget


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive int; pass e.g. 8")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser, input_shape: bool) -> None:
    parser.add_argument("--model", required=True, help="file.py:factory, module:factory, or a Hugging Face id/path")
    if input_shape:
        parser.add_argument(
            "--input-shape", type=_shape, required=True, help="one sample, e.g. 3,128,128 or 128 (tokens)"
        )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``trady-peft``; each sub-command sets ``command`` to its name."""
    parser = argparse.ArgumentParser(
        prog="trady-peft", description="TraDy memory-constrained fine-tuning tools.", formatter_class=FORMATTER
    )
    sub = parser.add_subparsers(dest="command", required=True)
    budget = sub.add_parser(
        "budget",
        help="per-layer memory accounting (cost of one input channel) and totals",
        description="Print what one input channel of each layer costs (weights and input activations) and the "
        "totals, in the paper's units (values per sample) or in bytes.",
        formatter_class=FORMATTER,
    )
    _add_model_arguments(budget, input_shape=True)
    budget.add_argument("--batch-size", type=_positive_int, default=1, help="batch size (counts in bytes only)")
    budget.add_argument("--unit", choices=["values", "bytes"], default="values", help="unit of the table")
    budget.add_argument("--optimizer-state-bytes", type=int, default=8, help="per trained value, for --unit bytes")
    budget.add_argument("--convs-only", action="store_true", help="count convolutions only (as the paper does)")

    memory = sub.add_parser(
        "memory",
        help="measure one training step: TraDy vs LoRA vs full fine-tuning",
        description="Run one real training step of the model three ways (TraDy under the given budget, peft LoRA "
        "on the same layers, full fine-tuning) and print what each keeps: weights, trainable parameters, "
        "gradients, optimizer state and the activations autograd saves for backward (measured with "
        "torch.autograd.graph.saved_tensors_hooks), split by part of the network.",
        formatter_class=FORMATTER,
    )
    _add_model_arguments(memory, input_shape=True)
    memory.add_argument("--batch-size", type=_positive_int, default=8, help="batch size of the measured step")
    memory.add_argument(
        "--budget",
        type=_budget,
        default=None,
        help="memory_budget: 27946 (paper units) or '2MiB' (bytes); None: --channels-per-layer, or without it TraDy's "
        "default budget (a bank of the values LoRA r=8 would train on the same layers). A byte budget "
        "bounds everything the adapter adds to a training step: the bank parameter that holds the selected "
        "channels' trainable values, its gradient, its optimizer state, and the saved inputs of the selected "
        "channels.",
    )
    memory.add_argument(
        "--channels-per-layer",
        type=float,
        default=None,
        help="used when no --budget is given; None: TraDy's default budget",
    )
    memory.add_argument(
        "--strategy",
        default="trady",
        help="TraDyConfig.strategy; a model with no importance table falls back from 'trady' to 'd-full-random' "
        "with a warning, so pass d-full-random (or a layer ranking via rank-layers) for such a model",
    )
    memory.add_argument(
        "--modules-to-save", nargs="*", default=None, help="e.g. classifier (trained in full); None: no such module"
    )
    memory.add_argument(
        "--target-modules", nargs="*", default=None, help="layers TraDy and LoRA wrap; None: every supported layer"
    )
    memory.add_argument(
        "--max-depth",
        type=int,
        default=None,
        help="TraDyConfig.max_depth: draw only from the N blocks nearest the output (backprop stops higher); "
        "None: every block",
    )
    memory.add_argument(
        "--no-frozen-path-split",
        action="store_true",
        help="skip the extra TraDy step with the stock frozen path (the 'before' of the split by module type)",
    )
    memory.add_argument("--lora-r", type=int, default=8, help="rank of the LoRA comparison")
    memory.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer of the step")
    memory.add_argument("--png", default=None, help="also save a bar chart to this PNG file; None: no chart")

    rank = sub.add_parser(
        "rank-layers",
        help="rank a model's layers by cumulative RGN or LaRa and write an importance table entry",
        description="Fine-tune the model (all weights, AdamW) for a few steps on the given data, accumulate each "
        "layer's reweighted gradient norm (RGN, TraDy) or LaRa (MeDyate), and write the ranking with its top-K "
        "(97% of the total) and provenance as JSON, for TraDyConfig(layer_ranking=<file>).",
        formatter_class=FORMATTER,
    )
    _add_model_arguments(rank, input_shape=False)
    rank.add_argument(
        "--data",
        required=True,
        help="file.py:factory returning a dataloader of dicts with labels (Hugging Face style) or of (inputs, labels) "
        "pairs (any model called as model(inputs), cross-entropy loss)",
    )
    rank.add_argument("--steps", type=int, default=50, help="fine-tuning steps the scores accumulate over")
    rank.add_argument("--metric", choices=["rgn", "lara"], default="rgn", help="RGN (TraDy) or LaRa (MeDyate)")
    rank.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the fine-tuning")
    rank.add_argument("--family", default=None, help="table key; None: model_type or backbone class name")
    rank.add_argument("--exclude", nargs="*", default=None, help="layers not to rank, e.g. the classifier head")
    rank.add_argument("--output", default=None, help="JSON path; None: <family>.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``trady-peft`` with ``argv`` (default: the process's arguments); returns the exit status."""
    args = build_parser().parse_args(argv)
    from trady_peft import cli  # torch, transformers and peft load here, once the arguments are valid

    return cli.COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
