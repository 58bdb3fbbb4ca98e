"""Hypernet training steps per second: LoRAs on every layer vs. on the upper layers, with and without the cached
lower-layer states (``data.reuse_lower_states``), each with the LoRA at every position (``apply_from=all``) and
from the question on with the prompt head cached (``apply_from=question``). One process, the same batches for
every variant.

    OMP_NUM_THREADS=1 python scripts/hypernet_step_speed.py --model tiny --steps 20
    python scripts/hypernet_step_speed.py --model smollm2-135m-instruct --steps 5 --upper 15 --readout fastweight

A step is what ``Trainer.fit`` does per batch: the hypernet forward, the loss through the frozen LLM
(``HypernetModule.losses``), backward and an AdamW step. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hyper_prag.training.hypernet import HypernetDataModule, HypernetModule


def measure(model: str, layers: list[int] | None, reuse: bool, steps: int, batch_size: int, docs: int,
            kl_weight: float, apply_from: str = "all", readout: str = "mean", rank: int = 2) -> dict:
    torch.manual_seed(0)
    sizes = dict(doc_dim=32, emb_dim=8, width=32) if model == "tiny" else {}
    module = HypernetModule(model=model, layers=layers, kl_weight=kl_weight, apply_from=apply_from, readout=readout,
                            rank=rank, **sizes)
    data = HypernetDataModule(model=model, layers=layers, distill=kl_weight > 0, reuse_lower_states=reuse,
                              apply_from=apply_from, readout=readout,
                              batch_size=batch_size, max_train_docs=docs, max_val_pairs=8,
                              embed_layers=list(module.hypernet.config.embed_layers))
    started = time.perf_counter()
    data.setup("fit")
    setup_s = time.perf_counter() - started
    batches = iter(data.train_dataloader())
    optimizer = torch.optim.AdamW(module.hypernet.parameters(), lr=1e-4)
    times = []
    for step in range(steps + 1):  # the first step warms up allocators and is not counted
        batch = next(batches)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module.losses(batch)["loss"].backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - began)
    mean = sum(times) / len(times)
    return {"model": model, "readout": readout, "apply_from": apply_from,
            "layers": "all" if not layers else f"{min(layers)}-{max(layers)}",
            "lower_states_cached": bool(data.start), "steps": steps, "batch_size": batch_size,
            "s_per_step": round(mean, 4), "steps_per_s": round(1 / mean, 3), "setup_s": round(setup_s, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--upper", type=int, default=None, help="lowest adapted layer of the upper variants "
                        "(default: half the depth)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--docs", type=int, default=40, help="training documents (their QA pairs are the batches)")
    parser.add_argument("--kl-weight", type=float, default=0.0, help="> 0: with the teacher's top-k KL term")
    parser.add_argument("--readout", default="mean", choices=("mean", "attention", "fastweight"))
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--apply-from", nargs="+", default=["all", "question"], choices=("all", "question"))
    args = parser.parse_args()
    from hyper_prag.training.hypernet import shared_base

    depth = shared_base(args.model).num_layers
    upper = list(range(args.upper if args.upper is not None else depth // 2, depth))
    for layers, reuse in ((None, False), (upper, False), (upper, True)):
        for apply_from in args.apply_from:
            print(json.dumps(measure(args.model, layers, reuse, args.steps, args.batch_size, args.docs, args.kl_weight,
                                     apply_from, args.readout, args.rank)), flush=True)


if __name__ == "__main__":
    main()
