"""Keep the service's memory at its working set: freed memory beyond KEEP_FREE_BYTES goes back to the OS every
RELEASE_INTERVAL_S (`allocator.release_free_memory`).

Without it a service on tcmalloc stays at the size of its largest burst: a long codec decode or a crowd of
requests (a fuzz run grew it from 1 to 8 GB) leaves gigabytes of freed pages mapped and unused for good."""

from __future__ import annotations

import asyncio
import logging

from cosyapp.allocator import release_free_memory

log = logging.getLogger("cosyapp.server")

RELEASE_INTERVAL_S = 5.0
# Freed memory kept for reuse: a few chunks' worth of the model's temporary tensors, so steady streaming does
# not page-fault its buffers in again (why the service runs on tcmalloc at all).
KEEP_FREE_BYTES = 256 * 2**20


async def release_memory_periodically(interval_s: float = RELEASE_INTERVAL_S) -> None:
    """Run until cancelled (the app's lifespan owns it)."""
    while True:
        await asyncio.sleep(interval_s)
        released = await asyncio.to_thread(release_free_memory, KEEP_FREE_BYTES)
        if released:
            log.debug("gave %.0f MB of freed memory back to the system", released / 2**20)
