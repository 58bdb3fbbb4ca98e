"""Training entry points of hyper-prag: the Lightning modules, data modules and CLIs of both trainers.

    python -m train.hypernet fit --config configs/hypernet/<name>.yaml    (the hypernetwork)
    python -m train.encode --config configs/encode/<name>.yaml            (per-document LoRAs)

This package builds on the library (``hyper_prag``) and is run from a checkout; the library never
imports it and the wheel does not install it.
"""
