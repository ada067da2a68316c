"""glibc malloc tuning for XLA:CPU training.

By default glibc mmaps every block above 32 MB and unmaps it on free, so the big per-round buffers of a
vmapped round (the [C, B, T, vocab] logits and their gradients) are page-faulted and zeroed again every
round. Keeping freed memory in one arena made rounds about 10-25% faster here
(benchmarks/round_throughput.py). Set FEDJAX_CODE_MALLOC=default to leave malloc alone.

Sampling is the opposite case: its KV-cache window grows and shrinks, so buffers of ever new sizes come and go,
and a heap that is never trimmed fragments (SmolLM2-135M, 240 samples: 12.5 GB resident against 5.5 GB with
glibc's defaults, and the full 1,640-sample HumanEval run was killed at 24 GB). ``glibc_defaults`` restores
mmap and trimming around it.
"""

import contextlib
import ctypes
import os

# mallopt parameters (malloc.h): M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD.
_SETTINGS = [(-8, 1), (-4, 0), (-1, -1), (-2, 1 << 28)]


_TUNED = False  # tune_malloc succeeded


def tune_malloc() -> bool:
    """One arena, no mmap'd chunks, no trimming; True if glibc accepted every setting."""
    global _TUNED
    _TUNED = os.environ.get("FEDJAX_CODE_MALLOC") != "default" and _mallopt(_SETTINGS)
    return _TUNED


_DEFAULTS = [(-4, 65536), (-1, 128 * 1024), (-2, 0)]  # glibc's M_MMAP_MAX, M_TRIM_THRESHOLD, M_TOP_PAD


def _mallopt(settings) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):  # not glibc
        return False


@contextlib.contextmanager
def glibc_defaults():
    """Within the block, large buffers are mmapped and freed memory trimmed, as glibc does by default, when
    ``tune_malloc`` had tuned it; the tuning is restored after."""
    undo = _TUNED and _mallopt(_DEFAULTS)
    try:
        yield
    finally:
        if undo:
            _mallopt(_SETTINGS)
