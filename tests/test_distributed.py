"""Beyond one machine: encoding and hypernet training with Lightning's DDP on 2 CPU processes (gloo).

Every distributed run is a real launch of an entry point as a subprocess with ``--strategy ddp --devices 2``:
``python -m train.encode …`` and ``python -m train.hypernet fit …``, where Lightning's launcher starts the
second rank by re-running the command, and ``torchrun … -m train.encode …``, where torchrun starts both and
Lightning reads its environment. The cache (``HYPER_PRAG_CACHE``: the benchmark) is a temporary folder;
each rank runs one thread so that two ranks fit the two cores of CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyper_prag.benchmark import load_or_make_default
from hyper_prag.api import encode as encode_corpus_split, load_encode_config
from hyper_prag.encoders.hypernet import load_hypernet
from hyper_prag.hypernet import EmbeddingCache, doc_embeddings, text_hash
from hyper_prag.store import LoraStore

ROOT = Path(__file__).parents[1]
# The tiny config's 8 test documents, one LoRA bank of 2 documents per chunk (4 chunks, 2 per rank), every
# LoRA starting from a brief warm-up LoRA (rank 0 trains it, the others receive it: its hash is in the key).
ENCODE = ["--config", "configs/encode/tiny.yaml", "--chunk_size", "2", "--store_dtype", "float32", "--logger", "none",
          "--progress", "false", "--trainer.init", "warmup", "--warmup_docs", "2", "--warmup_steps", "4"]
DDP = ["--strategy", "ddp", "--devices", "2"]
TIMEOUT = 300  # seconds a launch may take before the test fails instead of hanging


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def child_env(cache: Path) -> dict[str, str]:
    return os.environ | {"HYPER_PRAG_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> LoraStore:
    """The store one process makes from the same config (in this process, no launcher)."""
    store = tmp_path_factory.mktemp("reference") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: float sums split over threads round differently, and the
    try:                      # warm-up LoRA's bytes (hence every key) would differ from the ranks'
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HYPER_PRAG_CACHE", str(cache))
            report = encode_corpus_split(**load_encode_config(None, ENCODE + ["--store", str(store)]))
    finally:
        torch.set_num_threads(threads)
    assert (report.encoded, report.skipped) == (8, 0)
    return LoraStore(store)


def encode(store: Path, cache: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """Starts ``python [launcher] -m train.encode`` on the tiny config (stdout and stderr in one pipe)."""
    command = [sys.executable, *launcher, "-m", "train.encode", *ENCODE, "--store", str(store), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=child_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finished(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-4000:]
    return output


def reports(output: str) -> set[tuple[int, int]]:
    """``(encoded, skipped)`` of each rank's EncodeReport log line."""
    return {(int(e), int(s)) for e, s in re.findall(r"EncodeReport\(encoded=(\d+), skipped=(\d+)", output)}


def sidecar_keys(store: Path) -> list[str]:
    """Every key of every committed shard, duplicates included (the manifest as written)."""
    return [key for sidecar in (store / "shards").glob("*.json") for key in json.loads(sidecar.read_text())["entries"]]


def assert_same_loras(store: LoraStore, reference: LoraStore) -> None:
    assert sorted(store.keys()) == sorted(reference.keys())
    for key in reference.keys():
        got, want = store.get(key), reference.get(key)
        for m in want.spec.target_modules:
            torch.testing.assert_close(got.A[m], want.A[m], atol=1e-6, rtol=0)
            torch.testing.assert_close(got.B[m], want.B[m], atol=1e-6, rtol=0)


def children(pid: int) -> list[int]:
    """PIDs of the processes ``pid`` started (Lightning's launcher: the other local ranks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid …"
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def test_two_ranks_store_exactly_the_loras_of_one_process(tmp_path, cache, reference):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    output = finished(encode(tmp_path / "store", cache, *DDP, launcher=torchrun))
    assert set(re.findall(r"rank (\d) of 2: (\d+) chunks", output)) == {("0", "2"), ("1", "2")}  # both ranks worked
    assert reports(output) == {(8, 0)}  # every rank reports the run's totals
    assert sorted(sidecar_keys(tmp_path / "store")) == sorted(reference.keys())  # each document stored once
    assert_same_loras(LoraStore(tmp_path / "store"), reference)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the second rank through /proc")
def test_a_killed_rank_is_resumed_and_every_document_encoded_once(tmp_path, cache, reference):
    store = tmp_path / "store"
    run = encode(store, cache, *DDP, "--chunk_size", "1")  # 8 chunks: a rank stores 4 shards one by one
    deadline = time.monotonic() + TIMEOUT
    while not list((store / "shards").glob("*.json")):  # the first LoRA is committed: the run is under way
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-4000:]
        time.sleep(0.02)
    ranks = [pid for pid in children(run.pid) if "train.encode" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(ranks) == 1
    os.kill(ranks[0], signal.SIGKILL)  # rank 1 dies; Lightning's launcher then stops rank 0
    output, _ = run.communicate(timeout=TIMEOUT)
    assert run.returncode != 0, output[-4000:]
    partial = len(LoraStore(store))
    assert 0 < partial < 8, "the rank was not killed mid-run"

    output = finished(encode(store, cache, *DDP, "--chunk_size", "1"))  # the same command again
    assert reports(output) == {(8 - partial, partial)}  # only the missing documents were encoded
    assert sorted(sidecar_keys(store)) == sorted(reference.keys())  # every document exactly once
    LoraStore(store).verify()
    assert_same_loras(LoraStore(store), reference)


def test_hypernet_trains_with_ddp_and_writes_a_loadable_checkpoint(tmp_path, cache, tiny, monkeypatch):
    command = [sys.executable, "-m", "train.hypernet", "fit", "--config", "configs/hypernet/tiny.yaml",
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--data.embedding_cache", str(tmp_path / "emb")]
    result = subprocess.run(command, cwd=ROOT, env=child_env(cache), capture_output=True, text=True, timeout=TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output and "distributed_backend=gloo" in output
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert len(ckpts) == 1, ckpts  # rank 0 alone logs and checkpoints: one run folder
    metrics = (ckpts[0].parents[1] / "metrics.csv").read_text()
    assert "val/loss" in metrics and "train/ce" in metrics
    assert torch.load(ckpts[0], map_location="cpu", weights_only=False)["global_step"] == 4
    hypernet = load_hypernet(ckpts[0], tiny)
    assert any(head.weight.abs().max() > 0 for head in hypernet.head_B.values())  # trained: B heads start at 0
    # The cache holds the doc embeddings of the 16 training and every validation document (prepare_data).
    monkeypatch.setenv("HYPER_PRAG_CACHE", str(cache))
    corpus = load_or_make_default()
    docs = corpus.split("train").documents[:16] + corpus.split("val").documents
    (cached,) = (tmp_path / "emb").glob("*.safetensors")
    assert set(load_file(cached)) == {text_hash(d.text) for d in docs}


def test_embedding_cache_writers_keep_each_others_rows(tmp_path, tiny):
    first, second = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)  # two ranks that opened the cache together
    texts = ["Pell is a dog.", "Zorvath is a blue mineral found only in the caves of Tellin."]
    first.get(tiny, texts[:1], [0, 1])
    second.get(tiny, texts[1:], [0, 1])  # saves after the first: its file must keep the first's row
    assert len(load_file(EmbeddingCache(tmp_path).path(tiny, [0, 1], 512))) == 2
    torch.testing.assert_close(EmbeddingCache(tmp_path).get(tiny, texts, [0, 1]), doc_embeddings(tiny, texts, [0, 1]))
