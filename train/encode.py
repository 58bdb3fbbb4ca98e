"""``python -m train.encode --config configs/encode/<name>.yaml``: :mod:`hyper_prag.training.encode` under its
old name (the same as ``hyper-prag train encode …`` and ``hyper-prag encode …``)."""

import sys

from hyper_prag.training.encode import *  # noqa: F401,F403  (re-exported under the old name)

if __name__ == "__main__":
    from hyper_prag.cli import main as cli

    sys.exit(cli(["train", "encode", *sys.argv[1:]]))
