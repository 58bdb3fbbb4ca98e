"""``python -m train.hypernet fit --config configs/hypernet/<name>.yaml``: :mod:`hyper_prag.training.hypernet`
under its old name (the same as ``hyper-prag train hypernet fit …``)."""

import sys

from hyper_prag.training.hypernet import *  # noqa: F401,F403  (re-exported under the old name)

if __name__ == "__main__":
    from hyper_prag.cli import main as cli

    sys.exit(cli(["train", "hypernet", *sys.argv[1:]]))
