"""The trainers' old home, kept so that commands and imports written for a checkout still work.

    python -m train.hypernet fit --config configs/hypernet/<name>.yaml    = hyper-prag train hypernet fit …
    python -m train.encode --config configs/encode/<name>.yaml            = hyper-prag train encode …

The code lives in :mod:`hyper_prag.training` (installed with the package, run from any folder); these
modules re-export it under the old names. The library never imports this package.
"""
