"""A task module that takes 1.5 s to import (``pool="process"`` children import it).

Its import stands for a heavy module (a model, a big library) or a loaded machine.
"""

from __future__ import annotations

import time

time.sleep(1.5)


def quick(n: int) -> int:
    """Return ``n`` at once."""
    return n
