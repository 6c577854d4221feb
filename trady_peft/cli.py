"""The ``trady-peft`` command line.

``trady-peft budget`` prints the per-layer memory accounting of a model (what one input channel
of each layer costs in weights and activations, and the totals), so a budget can be chosen
before training.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from .budget import memory_accounting


def load_model(spec: str) -> nn.Module:
    """Build a model from ``file.py:factory``, ``package.module:factory``, or a Hugging Face id/path."""
    if ":" in spec and not Path(spec).exists():
        target, factory = spec.rsplit(":", 1)
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise SystemExit(f"--model {spec!r}: file {target!r} does not exist.")
            sys.path.insert(0, str(path.parent.resolve()))
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        if not hasattr(module, factory):
            raise SystemExit(f"--model {spec!r}: {target!r} has no {factory!r}.")
        return getattr(module, factory)()
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(spec)
    except OSError as err:
        raise SystemExit(
            f"--model {spec!r} is neither 'file.py:factory', 'module:factory' nor a loadable Hugging Face "
            f"model ({err.__class__.__name__}). Example: --model benchmarks/paper_models.py:mobilenet_v2_w035"
        ) from None


def example_inputs(model: nn.Module, shape: list[int], batch_size: int):
    """Zeros of ``[batch_size, *shape]``: token ids for a text model, floats otherwise."""
    if getattr(model, "main_input_name", None) == "input_ids":
        return {"input_ids": torch.zeros(batch_size, *shape, dtype=torch.long)}
    return torch.zeros(batch_size, *shape)


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 3,128,128 or 128") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 3,128,128 or 128")
    return dims


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trady-peft", description="TraDy memory-constrained fine-tuning tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    budget = sub.add_parser(
        "budget",
        help="per-layer memory accounting (cost of one input channel) and totals",
        description="Print what one input channel of each layer costs (weights and input activations) and the "
        "totals, in the paper's units (values per sample) or in bytes.",
    )
    budget.add_argument("--model", required=True, help="file.py:factory, module:factory, or a Hugging Face id/path")
    budget.add_argument("--input-shape", type=_shape, required=True, help="one sample, e.g. 3,128,128 or 128 (tokens)")
    budget.add_argument("--batch-size", type=int, default=1, help="batch size (counts in bytes only)")
    budget.add_argument("--unit", choices=["values", "bytes"], default="values")
    budget.add_argument("--optimizer-state-bytes", type=int, default=8, help="per trained value, for --unit bytes")
    budget.add_argument("--convs-only", action="store_true", help="count convolutions only (as the paper does)")
    budget.set_defaults(func=cmd_budget)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
