"""The one exception type a user of hyper-prag can cause and should catch.

Every error that bad input can trigger (a missing model file, a malformed corpus line, a LoRA made
for another base model, a corrupted store shard) is raised as :class:`HyperPragError` with a
message that says what went wrong *and what to do about it*.
"""


class HyperPragError(Exception):
    """An error caused by input or environment that the user can fix; the message says how."""
