"""LoRA store at scale: bytes per document and the time to fetch + combine the k LoRAs of a question.

    .venv/bin/python benchmarks/store_scale.py                         # 10^2, 10^3, 3·10^3 docs (bf16) + dtypes
    .venv/bin/python benchmarks/store_scale.py --sizes 100 --dtype-docs 64 --queries 20   # seconds, smoke test

Writes synthetic stores in a temporary folder (deleted at the end) through the real
:class:`~hyper_prag.store.LoraStore` (same shards, sidecars, fsyncs), with SmolLM2-135M's FFN shapes:
30 layers; gate/up (576 → 1536), down (1536 → 576); rank 2. The LoRAs are random (A ~ U(±1/√d_in) as
PEFT initialises it, B ~ N(0, 0.02)); a pool of distinct LoRAs is reused under distinct keys, so the
bytes written and read are real while generating them stays cheap.

Per store size it reports:
  * bytes per document (shards + safetensors headers; sidecars listed separately),
  * write throughput, and the time to open the store (read every sidecar into the in-memory index),
  * the median time of one question's lookup: ``get_many`` of k random keys + ``combine(..., "sum")``,
    "hot" (every shard handle open, every page cached: a serving process whose store fits in RAM; wall
    and CPU time) and "cold" (a new reader and the store's pages dropped from the OS cache with
    ``posix_fadvise(DONTNEED)`` on its own files only, so each question opens shards and reads from disk),
  * the time to re-open one shard whose pages are cached (what a miss of the LRU of open handles costs).
Then a projection to 10^4 / 10^5 / 10^6 documents: bytes by arithmetic, open time linear in the number of
entries (it parses every sidecar), lookup time from the measured trend plus LRU misses once the shards
outnumber the open handles.

Measured on the 2-core dev box (shared, load average 5-6 from other jobs), default arguments, 62 s:
bytes per document 1,521,533 (fp32) / 761,217 (bf16) / 383,359 (int8), i.e. the tensors plus ~1 kB of
safetensors header (+ ~316 B of sidecar JSON); writes 90-125 MB/s (fsync'd; int8 59 MB/s, it quantizes);
opening the store 12.6 µs per entry (38 ms for 3,000); a k = 3 question, fetch + combine, hot: 1.9 ms
(100 docs), 1.9 ms (1,000), 2.2 ms (3,000) (int8 3.1 ms: dequantization); cold, from disk: 27 / 33 / 39 ms;
re-opening a cached shard 0.42 ms. Projected for 10^6 documents: 761 GB bf16 (383 GB int8), 15,625
shards, 12.6 s to open, 0.42 GB of index in RAM, ~3 ms per question if the store fits the page cache
and ~33 ms from disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from safetensors import safe_open

from hyper_prag.combine import combine
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.store import LoraStore

SMOLLM2_DIMS = {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # module -> (d_in, d_out)
SMOLLM2_LAYERS = 30
IDENTITY = "synthetic-smollm2-135m-shapes"


def lora_pool(size: int, rank: int, seed: int = 0) -> list[Lora]:
    """Returns ``size`` distinct random LoRAs with SmolLM2's FFN shapes."""
    spec = LoraSpec(rank=rank, alpha=32.0, layers=tuple(range(SMOLLM2_LAYERS)), base_model=IDENTITY)
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(size):
        A, B = {}, {}
        for m, (d_in, d_out) in SMOLLM2_DIMS.items():
            bound = d_in ** -0.5
            A[m] = torch.empty(SMOLLM2_LAYERS, rank, d_in).uniform_(-bound, bound, generator=gen)  # (L, r, d_in)
            B[m] = torch.empty(SMOLLM2_LAYERS, d_out, rank).normal_(0.0, 0.02, generator=gen)  # (L, d_out, r)
        pool.append(Lora(spec, A, B))
    return pool


def doc_key(i: int) -> str:
    return hashlib.sha256(f"synthetic document {i}".encode()).hexdigest()  # same form as store_key


def write_store(root: Path, n_docs: int, dtype: str, shard_size: int, pool: list[Lora]) -> float:
    """Fills a store with ``n_docs`` LoRAs, ``shard_size`` per ``put_many``; returns the seconds taken."""
    store = LoraStore(root, dtype=dtype)
    start = time.perf_counter()
    for lo in range(0, n_docs, shard_size):
        store.put_many([(doc_key(i), pool[i % len(pool)], {"doc_id": f"d{i}"}) for i in range(lo, min(n_docs, lo + shard_size))])
    return time.perf_counter() - start


def drop_page_cache(root: Path) -> None:
    """Evicts this store's files (only them) from the OS page cache; clean pages go at once."""
    for path in (root / "shards").iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_questions(store: LoraStore, n_docs: int, k: int, n_questions: int, rng: random.Random) -> dict[str, float]:
    """Median wall and CPU milliseconds of fetch (``get_many`` of k random keys) + combine per question.

    CPU time (``time.process_time``) is reported beside wall time because the shared dev box is often
    oversubscribed, and a preempted question's wall time measures the other jobs, not the store.
    """
    fetch, merge, total, cpu = [], [], [], []
    for _ in range(n_questions):
        keys = [doc_key(i) for i in rng.sample(range(n_docs), k)]
        c0, t0 = time.process_time(), time.perf_counter()
        loras = store.get_many(keys, base_model=IDENTITY)
        t1 = time.perf_counter()
        combined = combine(loras, "sum")
        t2, c2 = time.perf_counter(), time.process_time()
        assert combined.spec.rank == k * loras[0].spec.rank
        fetch.append(t1 - t0)
        merge.append(t2 - t1)
        total.append(t2 - t0)
        cpu.append(c2 - c0)
    return {name: 1e3 * statistics.median(v) for name, v in
            (("fetch_ms", fetch), ("combine_ms", merge), ("total_ms", total), ("cpu_ms", cpu))}


def measure(root: Path, n_docs: int, dtype: str, shard_size: int, pool: list[Lora], k: int, n_questions: int,
            n_cold: int, seed: int) -> dict:
    """Writes one store and measures it (see the module docstring)."""
    write_s = write_store(root, n_docs, dtype, shard_size, pool)
    shards = root / "shards"
    shard_bytes = sum(p.stat().st_size for p in shards.glob("*.safetensors"))
    sidecar_bytes = sum(p.stat().st_size for p in shards.glob("*.json"))
    drop_page_cache(root)
    t0 = time.perf_counter()
    store = LoraStore(root)  # parses every sidecar
    open_s = time.perf_counter() - t0
    assert len(store) == n_docs and store.stats()["bytes"] == shard_bytes
    rng = random.Random(seed)
    cold = []
    for _ in range(n_cold):  # cold: a fresh reader (no open shards) and nothing of the store in the page cache
        drop_page_cache(root)
        reader = LoraStore(root)
        keys = [doc_key(i) for i in rng.sample(range(n_docs), k)]
        t0 = time.perf_counter()
        combine(reader.get_many(keys, base_model=IDENTITY), "sum")
        cold.append(time.perf_counter() - t0)
    for i in range(n_docs):  # hot: every LoRA read once (all pages cached, every shard handle open)
        store.get(doc_key(i))
    hot = time_questions(store, n_docs, k, n_questions, rng)
    opens = []
    for path in sorted(shards.glob("*.safetensors"))[:64]:  # what an LRU miss costs when the pages are cached
        t0 = time.perf_counter()
        safe_open(str(path), framework="pt")
        opens.append(time.perf_counter() - t0)
    return {
        "docs": n_docs, "dtype": dtype, "shard_size": shard_size, "shards": store.stats()["shards"],
        "bytes_per_doc": shard_bytes / n_docs, "sidecar_bytes_per_doc": sidecar_bytes / n_docs,
        "write_MB_per_s": shard_bytes / 1e6 / write_s, "write_s": write_s, "open_ms": 1e3 * open_s,
        "hot_fetch_ms": hot["fetch_ms"], "hot_combine_ms": hot["combine_ms"], "hot_total_ms": hot["total_ms"],
        "hot_cpu_ms": hot["cpu_ms"], "cold_total_ms": 1e3 * statistics.median(cold),
        "shard_open_ms": 1e3 * statistics.median(opens),
    }


def index_bytes_per_entry(root: Path) -> float:
    """Python heap bytes of the in-memory index per entry (tracemalloc while opening the store)."""
    tracemalloc.start()
    store = LoraStore(root)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / len(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000], help="store sizes (bf16)")
    parser.add_argument("--dtype-docs", type=int, default=128, help="store size of the fp32/bf16/int8 comparison")
    parser.add_argument("--shard-size", type=int, default=64, help="LoRAs per put_many, i.e. per shard")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--k", type=int, default=3, help="LoRAs fetched and combined per question")
    parser.add_argument("--queries", type=int, default=100, help="questions timed per store")
    parser.add_argument("--cold-queries", type=int, default=30, help="questions timed cold per store")
    parser.add_argument("--pool", type=int, default=64, help="distinct random LoRAs reused under distinct keys")
    parser.add_argument("--tmp", default=None, help="parent of the temporary store folder (default: system temp)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a lookup serves one question; keep the shared machine polite
    pool = lora_pool(args.pool, args.rank)
    values = sum(t.numel() for lora in pool[:1] for t in (*lora.A.values(), *lora.B.values()))
    print(f"SmolLM2 FFN LoRA, r={args.rank}: {values:,} values = {4 * values / 1e6:.3f} MB fp32, "
          f"{2 * values / 1e6:.3f} MB bf16, {values / 1e6:.3f} MB int8 (+ scales)")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="store-scale-", dir=args.tmp))
    try:
        for dtype in ("float32", "bfloat16", "int8"):
            rows.append(measure(tmp / f"{dtype}-{args.dtype_docs}", args.dtype_docs, dtype, args.shard_size, pool,
                                args.k, args.queries, args.cold_queries, seed=1))
            shutil.rmtree(tmp / f"{dtype}-{args.dtype_docs}")
        for n in args.sizes:
            root = tmp / f"bf16-{n}"
            rows.append(measure(root, n, "bfloat16", args.shard_size, pool, args.k, args.queries, args.cold_queries, seed=2))
            if n == max(args.sizes):
                rows[-1]["index_bytes_per_entry"] = index_bytes_per_entry(root)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header = ("docs", "dtype", "shards", "bytes_per_doc", "sidecar_bytes_per_doc", "write_MB_per_s", "open_ms",
              "hot_fetch_ms", "hot_combine_ms", "hot_total_ms", "hot_cpu_ms", "cold_total_ms", "shard_open_ms")
    print("\n" + " | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[h]:.3g}" if isinstance(row[h], float) else str(row[h]) for h in header))

    # Projection: bytes are arithmetic; open time grows with the entries (sidecar parsing); lookups from the trend.
    scale = [r for r in rows if r["dtype"] == "bfloat16" and r["docs"] in args.sizes]
    big = scale[-1]
    per_entry_open_ms = big["open_ms"] / big["docs"]
    hot_ms = statistics.median(r["hot_total_ms"] for r in scale)
    cold_ms = statistics.median(r["cold_total_ms"] for r in scale)
    open_shard_ms = statistics.median(r["shard_open_ms"] for r in scale)
    print("\nmeasured trend (bf16): " + "; ".join(
        f"{r['docs']} docs: hot {r['hot_total_ms']:.1f} ms (cpu {r['hot_cpu_ms']:.1f}), cold {r['cold_total_ms']:.1f} ms"
        for r in scale))
    print(f"projection (bf16 unless named, shards of {args.shard_size}, LRU of 64 open shards): store open "
          f"{per_entry_open_ms * 1e3:.1f} µs/entry, index {big.get('index_bytes_per_entry', 0):.0f} B/entry in RAM, "
          f"shard (re)open {open_shard_ms:.2f} ms")
    by_dtype = {r["dtype"]: r["bytes_per_doc"] for r in rows if r["docs"] == args.dtype_docs}
    for n in (10**4, 10**5, 10**6):
        n_shards = -(-n // args.shard_size)
        miss = max(0.0, 1 - 64 / n_shards)  # chance that a random LoRA's shard is not among the open handles
        sizes = ", ".join(f"{d} {n * b / 1e9:.1f} GB" for d, b in by_dtype.items())
        print(f"  {n:>9,} docs: {sizes}; {n_shards:,} shards; open {n * per_entry_open_ms / 1e3:.1f} s, index "
              f"{n * big.get('index_bytes_per_entry', 0) / 1e6:.0f} MB RAM; k={args.k} lookup "
              f"≈ {hot_ms + args.k * miss * open_shard_ms:.1f} ms if the store fits the page cache, "
              f"≈ {cold_ms:.0f} ms from disk")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
