"""Load a saved TraDy adapter for inference, then merge it into the base weights.

``import trady_peft`` must come before loading (it registers the method with peft). With no
``--adapter``, a small MiniLM text-classification adapter is trained first (examples/
text_classification.py, tiny settings) so the example runs on its own.
"""

from __future__ import annotations

import argparse
import tempfile
import time

# torch, peft and trady_peft are imported in main(), after the arguments: `--help` is instant.


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="directory written by save_pretrained (MiniLM classifier); None: train a small one first",
    )
    args = parser.parse_args(argv)
    if args.adapter is not None:
        return run(args.adapter)
    import text_classification

    with tempfile.TemporaryDirectory(prefix="trady-adapter-") as out:
        text_classification.main(["--train-size", "128", "--test-size", "64", "--epochs", "1", "--output-dir", out])
        return run(f"{out}/adapter")


def run(adapter: str) -> dict:
    import torch
    from offline_assets import MiniLMClassifier, minilm_tokenizer, say
    from peft import PeftModel

    import trady_peft  # noqa: F401  (registers TraDy with peft: import it before loading)

    say(f"loading all-MiniLM-L6-v2 and the adapter in {adapter}")
    model = PeftModel.from_pretrained(MiniLMClassifier(), adapter).eval()
    tokenizer = minilm_tokenizer()
    texts = ["A triumph: warm, funny and beautifully acted.", "A dull, lifeless mess that drags on forever."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        adapted = model(**batch)["logits"]
        merged_model = model.merge_and_unload()  # a plain MiniLMClassifier with the deltas folded in
        start = time.perf_counter()
        merged = merged_model(**batch)["logits"]
        seconds = time.perf_counter() - start
    print("P(fresh):", [round(p, 3) for p in adapted.softmax(-1)[:, 1].tolist()])
    print(
        f"merged model agrees with the adapter: max |diff| = {(merged - adapted).abs().max().item():.2e}; "
        f"plain {type(merged_model).__name__}, {seconds * 1000:.0f} ms for the batch"
    )
    return {"adapted": adapted, "merged": merged, "merged_model": merged_model}


if __name__ == "__main__":
    main()
