"""Run the service on tcmalloc instead of glibc's malloc.

The model's tensors are allocated and freed by the thousand per streamed chunk, many of them megabytes
large (batched attention scores, stacked per-stream caches). glibc's malloc serves such blocks with fresh
mappings or hands freed heap tops back to the OS, so the next chunk page-faults the same memory in again,
in every worker thread's arena. tcmalloc keeps freed memory for reuse: at 8 concurrent streams on a 2-core
CPU, glibc's malloc made four times its page faults, spent 7 % of the CPU time in the kernel against its 3 %,
and gave 7 % less audio per second. An allocator has to be in place before the interpreter starts, so
`cosyapp serve` starts itself again, once, with tcmalloc preloaded.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

TCMALLOC = "tcmalloc_minimal"  # Debian/Ubuntu package libtcmalloc-minimal4 (scripts/setup.sh installs it)
# Set in the restarted process, so that a preload that did not take cannot restart it again and again.
RESTARTED_MARKER = "COSYAPP_TCMALLOC_RESTARTED"


def tcmalloc_loaded() -> bool:
    """Whether this process runs with tcmalloc (Linux: it is mapped into the process)."""
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def restart_with_tcmalloc() -> str:
    """Replace this process by the same command line with tcmalloc preloaded, when tcmalloc is installed and
    not loaded yet; returns (without restarting) a line that says why not otherwise."""
    if tcmalloc_loaded():
        return "memory allocator: tcmalloc"
    if os.environ.get(RESTARTED_MARKER):
        return "memory allocator: the system's (tcmalloc was preloaded but did not load)"
    library = ctypes.util.find_library(TCMALLOC) if sys.platform.startswith("linux") else None
    if library is None:
        return "memory allocator: the system's (tcmalloc is not installed: apt-get install libtcmalloc-minimal4)"
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), library]))
    env = dict(os.environ, LD_PRELOAD=preload, **{RESTARTED_MARKER: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # does not return


# ---- giving freed memory back -----------------------------------------------------------------------------
#
# tcmalloc keeps what the process frees in its page heap for reuse and hands it back to the OS only slowly: a
# burst of large requests (a long decode, many streams at once) leaves the process at its peak size for good.
# The service releases it when a good deal of it lies unused (`release_free_memory`, called periodically by the
# server): the steady working set stays mapped (no page faults per chunk), the peaks of bursts do not.

PAGEHEAP_FREE = b"tcmalloc.pageheap_free_bytes"
# Released per call: tcmalloc holds its page-heap lock while it releases, and every thread that allocates waits
# for it (the event loop too); small steps keep those waits short.
RELEASE_STEP_BYTES = 64 * 2**20


def _process_library() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def free_heap_bytes() -> int | None:
    """Bytes tcmalloc holds freed and unused (None when the process does not run on tcmalloc)."""
    if not tcmalloc_loaded():
        return None
    value = ctypes.c_size_t(0)
    found = _process_library().MallocExtension_GetNumericProperty(PAGEHEAP_FREE, ctypes.byref(value))
    return value.value if found else None


def release_free_memory(keep_bytes: int) -> int:
    """Hand freed memory back to the OS when more than `keep_bytes` of it is held; the bytes released (as far as
    known). On tcmalloc: its page heap; on glibc: `malloc_trim` (which releases the tops of its arenas)."""
    held = free_heap_bytes()
    if held is not None:
        library, start = _process_library(), held
        while held > keep_bytes:
            library.MallocExtension_ReleaseToSystem(ctypes.c_size_t(min(RELEASE_STEP_BYTES, held - keep_bytes)))
            left = free_heap_bytes() or 0
            if left >= held:
                break  # nothing more it can release
            held = left
        return start - held
    if sys.platform.startswith("linux"):
        _process_library().malloc_trim(ctypes.c_size_t(0))
    return 0
