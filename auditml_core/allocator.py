"""Keep freed memory in the process, so training steps reuse it instead of faulting in fresh pages.

glibc's malloc gives large freed blocks back to the OS: blocks above a threshold that adapts (from
128 KiB) are mmap'd and unmapped one by one, and free memory at the heap's top is trimmed past 128 KiB.
A training step allocates and frees the same activations and gradients every time (a few MB each
for the digits CNN), so each step came back to fresh, zero-filled pages: 400-2,600 page faults a step
(``scripts/bench_dp_step_parts.py``), and a digits step took 12.2 ms with them against 8.6 ms
without; DP-SGD, whose per-sample records add allocations, paid more than plain training. Raising
both thresholds keeps those blocks in the heap for reuse, at the cost of holding up to
``TRIM_THRESHOLD_BYTES`` of freed memory. PyTorch's CPU performance guide recommends jemalloc or
tcmalloc for the same reason; glibc's own settings need no extra library and no LD_PRELOAD.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap (glibc's largest accepted value on 64-bit: 32 MiB).
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the heap's top is given back to the OS only past this much.
TRIM_THRESHOLD_BYTES = 512 << 20

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where there is no glibc.

    Returns
    -------
    bool
        True when both settings were accepted (Linux with glibc), False otherwise (nothing changed).
    """
    global _done
    if _done is None:
        _done = _set_thresholds()
    return _done


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave its allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        log.debug("glibc refused the malloc thresholds; freed memory goes back to the OS as usual")
    return ok


__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]
