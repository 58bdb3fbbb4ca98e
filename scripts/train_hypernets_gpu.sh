#!/usr/bin/env bash
# scripts/train_hypernets_gpu.sh            (one GPU; both checkpoints trained and exported in under ten minutes)
# HYPERNET_GPU_DRY_RUN=1 scripts/train_hypernets_gpu.sh   (CPU dry run: the tiny model, a few steps each)
#
# Trains two context-distilled hypernetworks side by side on one GPU and exports them:
#   fictional  configs/hypernet/smollm2-distill.yaml  (the fictional benchmark's train split + its questions)
#   squad      configs/hypernet/smollm2-squad.yaml    (SQuAD v1.1 train paragraphs with their gold questions)
# SmolLM2-135M leaves most of an H200 idle at batch 32, so the two runs share it; each stops at its
# max_time (TRAIN_TIME) or max_steps, whichever comes first, or when its divergence guard trips (then
# its rolled-back last-good.ckpt is exported instead of last.ckpt).
#
# Nothing is downloaded: the GPU machine needs, in $HYPER_PRAG_CACHE, the converted model (made by any first
# load of smollm2-135m-instruct) and the SQuAD corpus (`hyper-prag fetch-data squad`) beforehand.
# Outputs: $OUT/<name>/ (train.log, command.txt, runs/…: checkpoints, csv/metrics.csv) and
# $OUT/hypernet-<name>.safetensors + .json (the inference checkpoints, with their validation curves).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/gpu-hypernets}
TRAIN_TIME=${TRAIN_TIME:-00:00:06:30}        # per run (DD:HH:MM:SS), both runs at once
CACHE=$(PYTHONPATH=$PWD "$PYTHON" -c "from hyper_prag.paths import cache_root; print(cache_root())")

if [[ "${HYPERNET_GPU_DRY_RUN:-0}" == 1 ]]; then
  # The same configs on the tiny random model: every stage runs (teacher cache, distillation, guard, export).
  TRAIN_TIME=00:00:05:00
  EXTRA=(--model.model tiny --model.embed_layers null --model.doc_dim 32 --model.emb_dim 8 --model.width 32
         --model.heads 4 --model.warmup_steps 2 --trainer.accelerator cpu --trainer.max_steps 6
         --trainer.val_check_interval 3 --trainer.limit_val_batches 2 --data.batch_size 4
         --data.max_train_docs 16 --data.max_val_pairs 8)
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use HYPERNET_GPU_DRY_RUN=1 on CPU')"
  EXTRA=(--trainer.accelerator gpu --trainer.devices 1)
fi
if [[ ! -d "$CACHE/data/squad" ]]; then
  echo "SQuAD is not in $CACHE/data: run 'hyper-prag fetch-data squad' where PyPI is reachable, then copy it here." >&2
  exit 2
fi

REPO=$PWD
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)

train() {  # name config: run in $OUT/<name>, where the config's relative runs/... paths land
  local name=$1 config=$2 dir="$OUT/$1"
  local args=(fit --config "$REPO/$config" --trainer.max_time "$TRAIN_TIME"
              --data.teacher_cache "$CACHE/teacher-$name" --data.embedding_cache "$CACHE/doc_embeddings-$name"
              "${EXTRA[@]}")
  echo "python -m train.hypernet ${args[*]}" > "$dir/command.txt"
  (cd "$dir" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m train.hypernet "${args[@]}" > train.log 2>&1)
}

export_run() {  # name run-folder
  local name=$1 run="$OUT/$1/runs/$2" ckpt
  ckpt="$run/checkpoints/last-good.ckpt"          # written only when the divergence guard stopped the run
  [[ -f "$ckpt" ]] || ckpt="$run/checkpoints/last.ckpt"
  "$PYTHON" -m hyper_prag.cli export-hypernet "$ckpt" "$OUT/hypernet-$name.safetensors" \
    --metrics "$run"/csv/version_*/metrics.csv --command "$(cat "$OUT/$name/command.txt")" \
    --note "scripts/train_hypernets_gpu.sh; exported from $(basename "$ckpt"). val/*: per-answer-token CE (loss: the \
right documents' LoRAs; loss_wrong_doc: another item's LoRAs; loss_bias_only: the bias LoRA alone; loss_closed_book: \
no LoRA; loss_teacher: the document in context) and the KL to the teacher of each."
}

mkdir -p "$OUT/fictional" "$OUT/squad"
started=$SECONDS
train fictional configs/hypernet/smollm2-distill.yaml & first=$!
train squad configs/hypernet/smollm2-squad.yaml & second=$!
status=0
wait $first || { status=$?; echo "fictional run failed: $OUT/fictional/train.log" >&2; }
wait $second || { status=$?; echo "squad run failed: $OUT/squad/train.log" >&2; }
[[ $status == 0 ]] || exit $status
export_run fictional hypernet-smollm2-distill
export_run squad hypernet-smollm2-squad
grep -h "divergence guard" "$OUT"/*/train.log || true
echo "trained and exported both hypernets in $((SECONDS - started)) s: $OUT/hypernet-{fictional,squad}.safetensors"
