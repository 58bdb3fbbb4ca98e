"""One-command smoke run on a GPU: encode, hypernetwork training steps, ask and evaluate, with figures.

    python scripts/gpu_smoke.py                              # SmolLM2 on the GPU in bf16 (make gpu-smoke)
    python scripts/gpu_smoke.py --device cpu --model tiny    # the dry run: the same stages on the tiny model

Stages (each timed; the figures land in ``--out`` as JSON and are printed):

1. load the base model on ``--device`` in ``--dtype`` (auto: bf16 on a GPU that supports it);
2. generation throughput: greedy answers to a batch of prompts → new tokens/s;
3. ``encode``: per-document LoRAs of ``--docs`` fictional test documents into a fresh store → docs/min;
4. hypernetwork training: ``hyper-prag train hypernet fit`` for ``--steps`` steps → seconds per step, run in a
   temporary folder (the config's relative ``runs/…`` paths, checkpoints included, land there, never in the checkout);
5. ``evaluate`` of closed-book, RAG and P-RAG on ``--questions`` questions (encoding the retrieved documents
   still missing) → seconds per question and F1; then ``ask`` with ``prag`` (reads the store only).

Nothing here is needed by the library; it only calls its typed API (and the training entry point).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct | tiny | folder | hub id")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cuda | cuda:N | cpu (the dry run)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU) | float32 | bfloat16 | float16")
    parser.add_argument("--docs", type=int, default=32, help="documents encoded")
    parser.add_argument("--questions", type=int, default=24, help="questions evaluated")
    parser.add_argument("--steps", type=int, default=20, help="hypernetwork training steps")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_smoke.json",
                        help="JSON file of the figures (nothing else is written outside a temporary folder)")
    args = parser.parse_args(argv)

    import torch

    from hyper_prag import assemble
    from hyper_prag.api import ask, encode, evaluate
    from hyper_prag.encoders.per_doc import PerDocConfig

    tiny = args.model == "tiny"
    figures: dict = {"model": args.model, "device": args.device, "command": "python scripts/gpu_smoke.py "
                     + " ".join(argv if argv is not None else sys.argv[1:])}
    start = time.perf_counter()
    base = assemble.load_model(args.model, args.device, args.dtype)
    figures |= {"load_s": time.perf_counter() - start, "dtype": str(base.dtype).removeprefix("torch."),
                "resolved_device": str(base.device),
                "gpu": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else None}

    from hyper_prag.prompts import question_prompt

    corpus = assemble.load_corpus("fictional").split("test")
    prompts = [question_prompt(base, q.question) for q in corpus.questions[:16]]
    base.generate(prompts[:2], max_new_tokens=4)  # warm-up: kernels, allocator
    if base.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = base.generate(prompts, max_new_tokens=32, min_new_tokens=32)
    if base.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    figures["generate_tokens_per_s"] = len(outputs) * 32 / seconds

    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        store = Path(tmp) / "store"
        start = time.perf_counter()
        report = encode(model=args.model, device=args.device, dtype=args.dtype, split="test", limit=args.docs,
                        store=str(store), chunk_size=8, trainer=PerDocConfig(lr=3e-3, epochs=2),
                        augment={"source": "template", "n_qa": 3, "n_rewrites": 0}, logger="none", progress=False)
        figures |= {"encode_docs": report.encoded, "encode_docs_per_min": 60 * report.encoded / (time.perf_counter() - start)}

        accelerator = "gpu" if base.device.type == "cuda" else "cpu"
        command = [sys.executable, "-m", "hyper_prag.cli", "train", "hypernet", "fit", "--config",
                   "tiny" if tiny else "smollm2", "--model.dtype", args.dtype, "--model.schedule", "constant",
                   "--trainer.max_steps", str(args.steps), "--trainer.accelerator", accelerator,
                   "--trainer.default_root_dir", str(Path(tmp) / "hypernet"), "--trainer.val_check_interval", str(args.steps)]
        start = time.perf_counter()
        env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(Path(tmp) / "wandb"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # In the temporary folder: the config's relative paths (loggers, checkpoints) resolve there.
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"hypernet training failed:\n{done.stderr[-3000:]}")
        figures |= {"hypernet_steps": args.steps, "hypernet_s_per_step_incl_setup": (time.perf_counter() - start) / args.steps}

        results = evaluate(["closed-book", "rag", "prag"], model=args.model, device=args.device, dtype=args.dtype,
                           store=store, limit=args.questions, out=None, progress=False, wandb_mode="disabled")
        figures["evaluate"] = {m.name: {"f1": m.scores["total"]["f1"]["mean"],
                                        "s_per_question": m.latency["median"]["total"]} for m in results.methods}
        # ask reads only: its question's documents were encoded by evaluate above
        start = time.perf_counter()
        answer = ask(corpus.questions[0].question, "prag", model=args.model, device=args.device, dtype=args.dtype,
                     store=store, max_new_tokens=16)
        figures |= {"ask_s": time.perf_counter() - start, "ask_answer": answer.prediction}
    if base.device.type == "cuda":
        figures["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(base.device) / 2**20
    text = json.dumps(figures, indent=2, default=str)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return figures


if __name__ == "__main__":
    main()
