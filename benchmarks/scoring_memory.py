"""What Det-RGN's channel scoring holds and costs, against the dense scoring and a training step.

For each tiny model of the tests (a MobileNet-like CNN, a BERT-like encoder, a Llama-like decoder,
built from config) under a byte budget that needs several chunks, ``strategy="d-det-rgn"``:

* **dense**: the dense way of scoring (every base weight trainable, its ``.grad`` summed over the
  batches; `tests.references.dense_gradient_norms`): peak saved bytes + the dense weight gradients;
* **scoring**: `TraDyModel.score_channels`: peak saved bytes + the chunk's accumulators;
* **step**: one training step (AdamW) of the period scoring drew: peak saved bytes + the bank's
  parameter, gradient and optimizer state;
* **time**: the scoring of one period (``chunks x batches`` forwards and backwards) over one
  training step, the fastest of three of each.

The saved bytes are counted independently of the library (`tests.references.SavedBytesPeak`:
distinct storages packed by autograd per forward, parameters and buffers left out).

Run: ``python benchmarks/scoring_memory.py`` (seconds on 2 CPU cores). It prints the table and
rewrites the block of ``docs/strategies.md`` between ``<!-- scoring_memory.py -->`` and
``<!-- /scoring_memory.py -->``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trady_peft  # noqa: E402
from tests.references import SavedBytesPeak, dense_gradient_norms  # noqa: E402
from tests.tiny_models import tiny_bert, tiny_cnn, tiny_llama  # noqa: E402

#: model kind -> (builder, byte budget that takes several scoring chunks)
KINDS = {"cnn": (tiny_cnn, "16KiB"), "bert": (tiny_bert, "64KiB"), "llama": (tiny_llama, "64KiB")}


def scoring_batches(kind: str, count: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    """``count`` seeded batches with labels for a model of ``kind``."""
    g = torch.Generator().manual_seed(1)
    if kind == "cnn":
        return [
            {
                "pixel_values": torch.randn(4, 3, 16, 16, generator=g).to(dtype),
                "labels": torch.randint(0, 4, (4,), generator=g),
            }
            for _ in range(count)
        ]
    ids = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(count)]
    if kind == "bert":
        return [{"input_ids": i, "labels": torch.randint(0, 3, (2,), generator=g)} for i in ids]
    return [{"input_ids": i, "labels": i} for i in ids]


def det_rgn_model(kind: str, dtype: torch.dtype = torch.float32, budget: str | None = None):
    """The tiny model of ``kind`` in ``dtype`` under a Det-RGN adapter (the kind's budget by default)."""
    builder, default = KINDS[kind]
    torch.manual_seed(0)  # the encoder's builder draws its weights from the global generator
    config = trady_peft.TraDyConfig(memory_budget=budget or default, strategy="d-det-rgn")
    return get_peft_model(builder().to(dtype), config)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(kind: str, batches: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """The figures of one model (bytes, and the time ratio): dense, scoring, step, chunks, time."""
    model = det_rgn_model(kind, dtype)
    data = scoring_batches(kind, batches, dtype)
    tuner = model.base_model
    tuner.probe(data[0])
    layers = [m for _, m in tuner.trady_layers("default")]
    resident = [*model.parameters(), *model.buffers()]

    def accumulators() -> int:
        probes = [getattr(m, "channel_probe", None) for m in layers]
        return _tensor_bytes(p.accumulator for p in probes if p is not None)

    torch.manual_seed(0)
    with SavedBytesPeak(tuner.model, resident, accumulators) as scoring:
        tuner.score_channels(data)
    scoring_times = []
    for _ in range(3):  # the fastest of three: the least disturbed by other work on the machine
        start = time.perf_counter()
        tuner.score_channels(data)
        scoring_times.append(time.perf_counter() - start)
    torch.manual_seed(0)
    with SavedBytesPeak(tuner.model, resident) as dense:
        dense_gradient_norms(model, data)
    dense_gradients = _tensor_bytes(m.base_layer.weight for m in layers)

    bank = tuner.trady_bank["default"].weight
    optimizer = torch.optim.AdamW([bank], lr=1e-3)
    times = []
    for _ in range(3):
        with SavedBytesPeak(tuner.model, resident) as step:
            start = time.perf_counter()
            model(**data[0])["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            times.append(time.perf_counter() - start)
    state = [v for v in optimizer.state[bank].values() if torch.is_tensor(v) and v.shape == bank.shape]
    return {
        "dense": dense.peak + dense_gradients,
        "scoring": scoring.peak,
        "step": step.peak + _tensor_bytes([bank, bank.grad, *state]),
        "chunks": scoring.passes // batches,
        "time": min(scoring_times) / min(times),
    }


def table(batches: int = 2) -> str:
    """The measured figures of every model kind, as a markdown table."""
    rows = [
        "| model | budget | dense scoring (B) | chunked scoring (B) | training step (B) | chunks | time / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, (_, budget) in KINDS.items():
        f = measure(kind, batches)
        figures = f"{f['dense']:,} | {f['scoring']:,} | {f['step']:,} | {f['chunks']} | {f['time']:.1f}"
        rows.append(f"| {kind} | {budget} | {figures} |")
    return "\n".join(rows)


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    text = table()
    print(text)
    page = ROOT / "docs" / "strategies.md"
    begin, end = "<!-- scoring_memory.py -->", "<!-- /scoring_memory.py -->"
    block = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    page.write_text(block.sub(lambda _: f"{begin}\n{text}\n{end}", page.read_text()))


if __name__ == "__main__":
    main()
