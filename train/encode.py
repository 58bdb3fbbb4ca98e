"""Per-document LoRA encoding from a YAML config (paper §3.2), the LightningCLI-style entry point.

    python -m train.encode --config configs/encode/tiny.yaml [--limit 4 --trainer.epochs 2 ...]

The schema is :func:`hyper_prag.api.encode`'s signature (parsed by jsonargparse, the
library under LightningCLI: the per-chunk LoRA bank is built from the data, so the module is not a
config object itself). ``hyper-prag encode --config ...`` runs the same function.
"""

from __future__ import annotations

import logging
import sys

from hyper_prag.api import encode, load_encode_config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    report = encode(**load_encode_config(None, argv))
    logging.getLogger("train.encode").info("%s", report)


if __name__ == "__main__":
    main()
