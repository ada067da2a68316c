"""glibc malloc tuning for XLA:CPU training.

By default glibc mmaps every block above 32 MB and unmaps it on free, so the big per-round buffers of a
vmapped round (the [C, B, T, vocab] logits and their gradients) are page-faulted and zeroed again every
round. Keeping freed memory in one arena made rounds about 10-25% faster here
(benchmarks/round_throughput.py). Set FEDJAX_CODE_MALLOC=default to leave malloc alone.
"""

import ctypes
import os

# mallopt parameters (malloc.h): M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD.
_SETTINGS = [(-8, 1), (-4, 0), (-1, -1), (-2, 1 << 28)]


def tune_malloc() -> bool:
    """One arena, no mmap'd chunks, no trimming; True if glibc accepted every setting."""
    if os.environ.get("FEDJAX_CODE_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in _SETTINGS)
    except (OSError, AttributeError):  # not glibc
        return False
