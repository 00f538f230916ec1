"""Handing freed memory back to the OS between the phases of a bounded-memory job.

``prepare`` bounds what it *holds* by ``memory_limit_mb``, but resident memory is what it holds
plus what the allocators keep after it is freed. Two allocators keep freed memory:

* glibc malloc (numpy arrays, Python objects): freed chunks stay in the heap, and after the first
  large array is freed its mmap threshold rises (up to 32 MB), so later arrays come from the heap
  too; a heap only shrinks from its top, so one live chunk above pins everything below it.
  ``prepare``'s phases free a lot in different shapes (the id sort's millions of small Python
  objects, then pass 2's large arrays), and without trimming each phase's high-water mark stays
  resident under the next one's: measured 10M interactions at a 128 MB bound, 385 MB peak RSS
  without, 312 MB with trimming (80 MB of it the interpreter and imports).
* Arrow's pool (mimalloc by default) keeps freed segments per thread until ``release_unused``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa


def _load_malloc_trim():
    # glibc only (musl, macOS have no malloc_trim): elsewhere this is Arrow's half alone.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Return the memory freed so far to the OS (Arrow's pool, then the C heap)."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
