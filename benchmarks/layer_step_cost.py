"""What one per-document training step costs when the LoRAs adapt only the upper decoder layers.

The backward pass stops at the lowest adapted layer (nothing below it has a gradient), so a LoRA on the
upper layers only makes every step of ``hyper_prag.encoders.per_doc`` cheaper. This script times one
step of a LoRA bank (forward, backward, AdamW) on the real base model for every lowest layer asked for,
beside the all-layer step in the same process, and writes the medians and their ratios to the all-layer
one. It measures cost only: what such LoRAs inject is the oracle study's question
(``benchmarks/perdoc_recipe.py``).

    python benchmarks/layer_step_cost.py --from 10 15 20 --out results/layer_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hyper_prag import assemble
from hyper_prag.encoders.per_doc import LoraBank, StepBatch
from hyper_prag.lora import LoraSpec, init_lora
from hyper_prag.model import BaseModel


def step_seconds(base: BaseModel, layers: tuple[int, ...], docs: int, tokens: int, repeats: int) -> float:
    """Median CPU seconds of one bank step: ``docs`` sequences of ``tokens`` random tokens, every token learned."""
    spec = LoraSpec(layers=layers).for_model(base)
    dims = {m: base.module_dims(m) for m in spec.target_modules}
    bank = LoraBank(base, init_lora(spec, dims, batch=docs), lr=3e-3)
    optimizer = bank.make_optimizer()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, base.tokenizer.vocab_size, (docs, tokens), generator=generator)
    batch = StepBatch(torch.arange(docs), ids, torch.ones_like(ids), ids.clone(), torch.tensor([], dtype=torch.long))
    times = []
    for _ in range(repeats):
        start = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        bank.loss(batch).backward()
        optimizer.step()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--from", dest="lowest", type=int, nargs="+", default=[10, 15, 20],
                        help="lowest adapted layer of each variant (the LoRA covers it and every layer above)")
    parser.add_argument("--docs", type=int, default=4, help="documents per bank step (the encode chunk size)")
    parser.add_argument("--tokens", type=int, default=60, help="tokens per sequence (a closed-book QA pair: ~60)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = assemble.load_model(args.model, "cpu")
    n = base.num_layers
    every = step_seconds(base, (), args.docs, args.tokens, args.repeats)
    rows = [{"layers": f"0-{n - 1}", "cpu_s_per_step": every, "ratio": 1.0}]
    for low in args.lowest:
        seconds = step_seconds(base, tuple(range(low, n)), args.docs, args.tokens, args.repeats)
        rows.append({"layers": f"{low}-{n - 1}", "cpu_s_per_step": seconds, "ratio": seconds / every})
    result = {"model": args.model, "docs": args.docs, "tokens": args.tokens, "repeats": args.repeats,
              "threads": args.threads, "rows": rows}
    for row in rows:
        print(f"layers {row['layers']:>6}: {row['cpu_s_per_step']:.3f} CPU s/step, {row['ratio']:.3f} of all layers")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
