""":mod:`hyper_prag.training.hypernet_data` under its old name."""

from hyper_prag.training.hypernet_data import *  # noqa: F401,F403  (re-exported under the old name)
