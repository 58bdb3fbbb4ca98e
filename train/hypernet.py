"""Hypernetwork training (amortized encoding), the LightningCLI entry point.

    python -m train.hypernet fit --config configs/hypernet/tiny.yaml
    python -m train.hypernet fit --config configs/hypernet/smollm2.yaml [--ckpt_path last.ckpt]

Module, data and CLI live in :mod:`hyper_prag.hypernet_train`.
"""

from hyper_prag.hypernet_train import main

if __name__ == "__main__":
    main()
