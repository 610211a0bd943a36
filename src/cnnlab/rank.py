"""This process's rank, as torchrun's environment gives it.

It imports nothing of cnnlab's, so that both errors.py (whose message about a lost rank names
this one) and launch.py (which imports errors.py) can use it without importing each other."""

from __future__ import annotations

import os


def env_rank() -> int:
    """This process's rank as torchrun's environment gives it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))
