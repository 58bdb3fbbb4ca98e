"""Re-binds a hypernetwork checkpoint recorded under the previous base-model identity to the current one.

    python scripts/migrate_base_identity.py hyper_prag/checkpoints/hypernet-smollm2.safetensors

The base-model identity used to hash a strided sample of the weights; it now hashes every weight (so a
model that differs in any value gets another identity). A checkpoint made for a model records that
model's identity and is refused by any other. This script proves that the loaded model is the one the
checkpoint was made for, by recomputing the previous identity from the loaded weights with the previous
algorithm (below, unchanged), and only then rewrites the recorded identity (safetensors metadata and the
JSON beside it, whose ``weights_sha256`` is updated). The tensors are not touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def previous_identity(model) -> str:
    """The identity the previous version computed: config keys + a strided sample of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    config = {k: getattr(model.config, k, None) for k in keys}
    outer = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    outer.update(digest.hexdigest().encode())
    return f"{config['model_type']}-{outer.hexdigest()[:16]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a NAME.safetensors inference checkpoint (NAME.json beside it)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base model it was made for")
    args = parser.parse_args()
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hyper_prag.encoders.hypernet import file_sha256
    from hyper_prag.model import load_base_model

    base = load_base_model(args.model, device="cpu", dtype="float32")
    with safe_open(str(args.checkpoint), "pt") as f:
        meta = json.loads(f.metadata()["hypernet"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old, now = meta["base_model"], previous_identity(base.model)
    if old == base.identity:
        print(f"{args.checkpoint} already records {base.identity}")
        return
    if old != now:
        raise SystemExit(f"{args.checkpoint} was made for {old}, but the loaded model's previous identity is {now}: "
                         "it is another model; nothing rewritten.")
    meta["base_model"] = base.identity
    meta["spec"]["base_model"] = base.identity
    save_file(tensors, str(args.checkpoint), metadata={"hypernet": json.dumps(meta, sort_keys=True)})
    described = args.checkpoint.with_suffix(".json")
    info = json.loads(described.read_text())
    info["base_model"] = info["spec"]["base_model"] = base.identity
    info["weights_sha256"] = file_sha256(args.checkpoint)
    info["base_identity_migrated_from"] = old
    described.write_text(json.dumps(info, indent=2) + "\n")
    print(f"{args.checkpoint}: {old} -> {base.identity} (previous identity recomputed from the loaded weights: {now})")


if __name__ == "__main__":
    main()
