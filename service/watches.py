"""One poller for every ``WatchJob`` stream.

A watch is a coroutine on the server's event loop that waits for news; it holds no RPC
thread. :class:`WatchHub` reads each watched job's state once per ``interval`` (in its own
thread, never the RPC pool: a saturated API does not stall the watches), whatever the
number of streams watching it, and wakes them. Streams past ``max_watches`` are refused
``RESOURCE_EXHAUSTED`` (:class:`TooManyWatches`); :meth:`WatchHub.close` ends them all
(server shutdown) with :class:`WatchesClosed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["TooManyWatches", "WatchHub", "WatchesClosed"]

_LOG = logging.getLogger(__name__)

S = TypeVar("S")


class TooManyWatches(RuntimeError):
    """RESOURCE_EXHAUSTED: as many watches are open as ``NOISESCORE_MAX_WATCHES`` allows."""


class WatchesClosed(RuntimeError):
    """UNAVAILABLE: the server is shutting down; watching again (elsewhere) can help."""


@dataclass
class _Topic(Generic[S]):
    """What the watchers of one job share: the latest snapshot (or the error reading it)."""

    watchers: int = 0
    version: int = 0
    snapshot: S | None = None
    error: Exception | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class WatchHub(Generic[S]):
    """``follow(key)`` yields ``read(key)`` now and after every poll, for every watcher.

    ``read`` is blocking (the job store); it runs in one dedicated thread, once per key
    and interval. Create and use on one event loop.
    """

    def __init__(self, read: Callable[[str], S], *, interval: float, max_watches: int) -> None:
        self._read = read
        self.interval = interval
        self.max_watches = max_watches
        self.open = 0
        self._topics: dict[str, _Topic[S]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noisescore-watch")
        self._closed = False

    async def follow(self, key: str) -> AsyncIterator[S]:
        """The current snapshot of ``key``, then each new one until the caller stops.
        Raises what ``read`` raises, :class:`TooManyWatches` or :class:`WatchesClosed`."""
        if self._closed:
            raise WatchesClosed("the server is shutting down: call WatchJob again")
        if self.open >= self.max_watches:
            raise TooManyWatches(
                f"{self.open} WatchJob streams are open, the limit is {self.max_watches} "
                "(NOISESCORE_MAX_WATCHES): close one, poll GetJob, or retry later"
            )
        loop = asyncio.get_running_loop()
        self.open += 1
        topic = self._topics.setdefault(key, _Topic())
        topic.watchers += 1
        try:
            seen = topic.version
            if topic.version and topic.error is None and topic.snapshot is not None:
                yield topic.snapshot  # polled at most one interval ago for another watcher
            else:
                yield await loop.run_in_executor(self._pool, self._read, key)
            self._ensure_poller()
            while True:
                async with topic.changed:
                    while topic.version == seen and not self._closed:
                        await topic.changed.wait()
                if self._closed:
                    raise WatchesClosed("the server is shutting down: call WatchJob again")
                seen = topic.version
                if topic.error is not None:
                    raise topic.error
                assert topic.snapshot is not None
                yield topic.snapshot
        finally:
            self.open -= 1
            topic.watchers -= 1
            if topic.watchers == 0 and self._topics.get(key) is topic:
                del self._topics[key]

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while self._topics and not self._closed:
            await asyncio.sleep(self.interval)
            keys = list(self._topics)
            results = await loop.run_in_executor(self._pool, self._read_all, keys)
            for key, (snapshot, error) in results.items():
                topic = self._topics.get(key)
                if topic is None:
                    continue
                async with topic.changed:
                    topic.snapshot, topic.error = snapshot, error
                    topic.version += 1
                    topic.changed.notify_all()

    def _read_all(self, keys: list[str]) -> dict[str, tuple[S | None, Exception | None]]:
        results: dict[str, tuple[S | None, Exception | None]] = {}
        for key in keys:
            try:
                results[key] = (self._read(key), None)
            except Exception as error:
                results[key] = (None, error)
        return results

    async def close(self) -> None:
        """End every watch (:class:`WatchesClosed`) and refuse new ones."""
        self._closed = True
        for topic in list(self._topics.values()):
            async with topic.changed:
                topic.changed.notify_all()
        if self._poller is not None:
            self._poller.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
