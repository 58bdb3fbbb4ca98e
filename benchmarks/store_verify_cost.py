"""What verifying stored LoRAs costs a question: fetch + verify + combine of k LoRAs vs. one generated token.

    .venv/bin/python benchmarks/store_verify_cost.py                  # SmolLM2-135M (converts its GGUF once, ~30 s)
    .venv/bin/python benchmarks/store_verify_cost.py --model tiny --repeats 20   # seconds, no model files

Every :meth:`~hyper_prag.store.LoraStore.get` hashes the stored bytes of the entry it serves (sha256 over
the entry's tensors, recorded at write time) and checks that the weights are finite. This script puts a
number on that: a store of ``--docs`` LoRAs with the base model's FFN shapes (random values, rank 2,
``--dtype`` storage, ``--shard-size`` entries per shard, as ``encode`` writes them) is read "hot" (shard
handles open, pages cached: a serving process), and per repeat, interleaved so that noise from other
jobs on the machine hits all three alike, it times

* ``verified``: ``combine(store.get_many(keys))`` for k random keys (what the online path does),
* ``unverified``: the same memory maps, tensors and ``combine`` without the hash and finiteness checks
  (what a read cost before verification),
* ``token``: one decoding step of the base model (one new token after a ``--prompt-tokens`` prompt,
  with the KV cache), i.e. the cost of generating ONE token.

Torch runs single-threaded by default (``--threads``): on an oversubscribed machine every small
multi-threaded op waits for its sleeping worker thread to be scheduled again (milliseconds), which then
dominates both reads and the token and measures the machine's load rather than the store.

It reports medians (wall time; CPU time beside it, as the shared 2-core dev box preempts), the ratios
verified / unverified and verified / token, and the cost of verifying one entry the first time
``missing()`` sees it (what ``encode`` pays per already-stored document to trust it). Writes a table
to stdout and ``results/store_verify_cost.json``.

Measured on the 2-core dev box (shared, load average 7-9), default arguments, ~70 s with the model
already converted: SmolLM2-135M, bf16 store (0.76 MB per LoRA), k = 3, medians of 60:
fetch + verify + combine 7.2 ms wall / 3.3 ms CPU; fetch + combine unverified 1.2 ms / 1.2 ms; one
generated token 85 ms / 41 ms. Verifying adds ~0.7 ms CPU per LoRA (sha256 of 0.76 MB ≈ 0.4 ms,
finiteness ≈ 0.01 ms, the rest decoding order and allocation); fetch + verify + combine of 3 LoRAs
costs 0.09x one token (wall; 0.08x in CPU time): the target "≤ one token" holds with a 10x margin.
First verification of one entry by ``missing()``: 0.6 ms. With ``--threads 0`` (torch's 2 threads)
on that oversubscribed box every row took hundreds of ms (531 / 526 / 400 ms): thread wake-ups, not work.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hyper_prag.combine import combine
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.model import BaseModel, load_base_model, tiny_base_model
from hyper_prag.store import LoraStore

RESULTS = Path(__file__).resolve().parents[1] / "results" / "store_verify_cost.json"


def random_loras(base: BaseModel, n: int, rank: int, seed: int) -> list[Lora]:
    """``n`` LoRAs with the base model's FFN shapes; A ~ U(±1/√d_in) as PEFT initialises it, B ~ N(0, 0.02)."""
    spec = LoraSpec(rank=rank).for_model(base)
    gen = torch.Generator().manual_seed(seed)
    L, out = len(spec.layers), []
    for _ in range(n):
        A, B = {}, {}
        for m in spec.target_modules:
            d_in, d_out = base.module_dims(m)
            A[m] = (torch.rand(L, rank, d_in, generator=gen) * 2 - 1) / d_in**0.5  # (L, r, d_in)
            B[m] = torch.randn(L, d_out, rank, generator=gen) * 0.02  # (L, d_out, r)
        out.append(Lora(spec, A, B))
    return out


def fetch_unverified(store: LoraStore, key: str) -> Lora:
    """What ``LoraStore.get`` did before verification: the same open memory maps, no hash, no finiteness check."""
    entry = store._index[key]
    handle, _, why = store._handle(entry.shard)
    assert handle is not None, why
    int8 = store._shard_info[entry.shard].get("dtype") == "int8"
    A, B = {}, {}
    for m in entry.spec.target_modules:
        A[m] = handle.get_tensor(f"{key}/A/{m}").float()  # (L, r, d_in)
        B[m] = handle.get_tensor(f"{key}/B/{m}").float()  # (L, d_out, r)
        if int8:
            A[m] *= handle.get_tensor(f"{key}/A_scale/{m}")
            B[m] *= handle.get_tensor(f"{key}/B_scale/{m}")
    return Lora(entry.spec, A, B)


class DecodeStep:
    """Times one new token: a forward of one token against the KV cache of a fixed prompt (cache cropped back after)."""

    def __init__(self, base: BaseModel, prompt_tokens: int) -> None:
        self.model = base.model
        text = base.chat_prompt("Tell me everything you know about the history of glassblowing in Venice. " * 8)
        ids = base.tokenizer(text, return_tensors="pt").input_ids[:, :prompt_tokens].to(base.device)  # (1, T)
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True)
        self.cache, self.length = out.past_key_values, ids.shape[1]
        self.next_id = out.logits[:, -1:].argmax(-1)  # (1, 1)

    @torch.no_grad()
    def __call__(self) -> int:
        position = torch.tensor([[self.length]], device=self.next_id.device)  # (1, 1)
        out = self.model(input_ids=self.next_id, past_key_values=self.cache, position_ids=position, use_cache=True)
        self.cache.crop(-1)  # drop the new token: every step times the same token after the same prompt
        return int(out.logits[0, -1].argmax())


def timed(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the packaged SmolLM2-135M), 'tiny', or a model folder")
    parser.add_argument("--docs", type=int, default=64, help="LoRAs in the store")
    parser.add_argument("--shard-size", type=int, default=8, help="LoRAs per shard (encode's default chunk size)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "int8"], default="bfloat16", help="storage dtype")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--k", type=int, default=3, help="LoRAs fetched and combined per question")
    parser.add_argument("--repeats", type=int, default=60, help="timed rounds (each: verified, unverified, token)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length before the timed token")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)

    base = tiny_base_model() if args.model == "tiny" else load_base_model(None if args.model == "smollm2" else args.model)
    pool = random_loras(base, min(args.docs, 16), args.rank, seed=0)
    rng = random.Random(0)
    step = DecodeStep(base, args.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="store-verify-") as tmp:
        store = LoraStore(tmp, dtype=args.dtype)
        keys = [f"doc-{i:06d}" for i in range(args.docs)]
        for lo in range(0, args.docs, args.shard_size):
            store.put_many([(k, pool[i % len(pool)], {"doc_id": k}) for i, k in enumerate(keys[lo:lo + args.shard_size], lo)])
        fresh, first = LoraStore(tmp), []  # missing() of a new reader: each entry read and hashed once
        for key in keys:
            first.append(timed(lambda: fresh.missing([key]))[0])
        for key in keys:  # hot: every shard handle open, every page cached
            store.get(key)
            fetch_unverified(store, key)
        for _ in range(3):
            step()
        rows = {"verified": [], "unverified": [], "token": []}
        for _ in range(args.repeats):
            chosen = rng.sample(keys, args.k)
            rows["verified"].append(timed(lambda: combine(store.get_many(chosen))))
            rows["unverified"].append(timed(lambda: combine([fetch_unverified(store, k) for k in chosen])))
            rows["token"].append(timed(step))
    med = {name: {"wall_ms": 1e3 * statistics.median(w for w, _ in v), "cpu_ms": 1e3 * statistics.median(c for _, c in v)}
           for name, v in rows.items()}
    lora_bytes = sum(t.numel() for t in (*pool[0].A.values(), *pool[0].B.values())) * {"float32": 4, "bfloat16": 2, "int8": 1}[args.dtype]
    result = {
        "command": " ".join(["benchmarks/store_verify_cost.py", *sys.argv[1:]]), "model": base.name, "dtype": args.dtype, "rank": args.rank, "k": args.k, "docs": args.docs,
        "shard_size": args.shard_size, "repeats": args.repeats, "prompt_tokens": step.length,
        "torch_threads": torch.get_num_threads(), "lora_bytes": lora_bytes,
        "fetch_verify_combine": med["verified"], "fetch_combine_unverified": med["unverified"], "one_token": med["token"],
        "ratio_verified_over_unverified": med["verified"]["wall_ms"] / med["unverified"]["wall_ms"],
        "ratio_verified_over_token": med["verified"]["wall_ms"] / med["token"]["wall_ms"],
        "first_verify_per_entry_ms": 1e3 * statistics.median(first),
    }
    print(f"model {base.name}, {args.dtype} store, r={args.rank}, {lora_bytes / 1e6:.2f} MB per LoRA, k={args.k}, "
          f"{args.repeats} repeats, torch threads {result['torch_threads']} (medians)")
    print(f"{'':34s}{'wall ms':>10s}{'cpu ms':>10s}")
    for label, name in (("fetch + verify + combine (k)", "verified"), ("fetch + combine, unverified (k)", "unverified"),
                        ("one generated token", "token")):
        print(f"{label:34s}{med[name]['wall_ms']:10.2f}{med[name]['cpu_ms']:10.2f}")
    print(f"verified / unverified = {result['ratio_verified_over_unverified']:.2f}x; "
          f"verified / one token = {result['ratio_verified_over_token']:.2f}x (target <= 1); "
          f"first verification of one entry (missing()) = {result['first_verify_per_entry_ms']:.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
