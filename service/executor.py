"""The RPC thread pool of the asyncio server: the servicer's blocking methods run here.

The server itself is ``grpc.aio``: streams that mostly wait (``WatchJob``, health
``Watch``) are coroutines on the event loop and hold no thread. Everything that blocks (the
store, ONNX Runtime, numpy) stays plain synchronous code in the servicer and runs in
:class:`RpcExecutor`'s pool of ``rpc_threads`` threads, behind an admission limit:

- at most ``max_calls`` such calls are in progress (running or waiting for a thread); one
  more is answered ``RESOURCE_EXHAUSTED`` at once, so an overloaded server sheds load
  instead of queueing without bound;
- :meth:`RpcExecutor.oldest_wait` is how long the oldest admitted call has been waiting for
  a thread: the server's readiness turns NOT_SERVING when it passes a grace
  (:mod:`noisescore.service.server`).

:func:`blocking_unary` and :func:`blocking_stream` turn a blocking handler into the
``grpc.aio`` behavior that runs it there, with a :class:`BlockingContext` that offers the
synchronous ``grpc.ServicerContext`` calls the servicer uses (``abort``, ``set_code``,
``is_active``, ``invocation_metadata``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import grpc

__all__ = ["BlockingContext", "RpcExecutor", "blocking_stream", "blocking_unary"]


class Aborted(Exception):
    """Raised in a pool thread by :meth:`BlockingContext.abort`; the bridge then aborts
    the call on the event loop with the same code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class BlockingContext:
    """The synchronous ``grpc.ServicerContext`` calls, for a handler in a pool thread.

    ``abort`` raises :class:`Aborted` (the bridge passes it to the real context);
    ``set_code``/``set_details`` are applied when the handler returns; ``is_active`` is
    False once the client went away or the server cancelled the call.
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.cancelled = False

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        raise Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Sent with the status, also when the handler aborts (``SubmitRelabels`` returns
        its per-row reasons this way with INVALID_ARGUMENT)."""
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def is_active(self) -> bool:
        return not (self.cancelled or self._context.done() or self._context.cancelled())

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def apply(self) -> None:
        """Copy ``set_code``/``set_details`` and the trailing metadata to the real context
        (on the event loop)."""
        if self._trailing:
            self._context.set_trailing_metadata(self._trailing)
        if self._code is not None:
            self._context.set_code(self._code)
            self._context.set_details(self._details)


class RpcExecutor:
    """``threads`` worker threads and an admission limit of ``max_calls`` calls in
    progress. :meth:`admit`/:meth:`release` and the bridges run on the event loop."""

    def __init__(self, threads: int, max_calls: int) -> None:
        self.threads = threads
        self.max_calls = max_calls
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="noisescore-rpc")
        self.in_progress = 0
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._waiting: dict[int, float] = {}  # token -> monotonic time queued (in order)

    def admit(self) -> bool:
        if self.in_progress >= self.max_calls:
            return False
        self.in_progress += 1
        return True

    def release(self) -> None:
        self.in_progress -= 1

    def busy_message(self) -> str:
        return (
            f"the server is busy: {self.in_progress} calls in progress, the limit is "
            f"{self.max_calls} (4 x NOISESCORE_RPC_THREADS={self.threads}); retry with backoff"
        )

    def oldest_wait(self) -> float:
        """Seconds the oldest call admitted but not yet running has waited for a thread."""
        with self._lock:
            first = next(iter(self._waiting.values()), None)
        return 0.0 if first is None else time.monotonic() - first

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def submit(self, function: Callable[..., Any], *args: Any) -> tuple[int, Future[Any]]:
        """Queue ``function(*args)``; ``(token, future)`` for :meth:`wait`."""
        token = next(self._tokens)
        with self._lock:
            self._waiting[token] = time.monotonic()

        def job() -> Any:
            with self._lock:
                self._waiting.pop(token, None)
            return function(*args)

        return token, self.pool.submit(job)

    async def wait(self, token: int, future: Future[Any]) -> Any:
        """The result of a :meth:`submit`; a cancelled wait drops the call if not started."""
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancel():  # never started: no longer waiting
                with self._lock:
                    self._waiting.pop(token, None)
            raise

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the pool; its result or exception, awaited."""
        return await self.wait(*self.submit(function, *args))

    @staticmethod
    def after(future: Future[Any] | None, function: Callable[[], Any]) -> None:
        """Call ``function`` once ``future`` (if any) has finished: at once when it has,
        else in the thread that finishes it."""
        if future is None:
            function()
        else:
            future.add_done_callback(lambda _: function())

    def shutdown(self) -> None:
        """Drop calls still waiting; running ones finish on their own (not awaited)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _refuse(executor: RpcExecutor, context: grpc.aio.ServicerContext) -> NoReturn:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, executor.busy_message())
    raise AssertionError("context.abort returned")


def blocking_unary(
    function: Callable[[Any, Any], Any], executor: RpcExecutor
) -> Callable[..., Any]:
    """The ``grpc.aio`` unary behavior that runs ``function(request, context)`` in the pool."""

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not executor.admit():
            await _refuse(executor, context)
        blocking = BlockingContext(context)
        try:
            result = await executor.run(function, request, blocking)
        except Aborted as aborted:
            await context.abort(aborted.code, aborted.details, blocking.trailing_metadata())
        except asyncio.CancelledError:
            blocking.cancelled = True
            raise
        finally:
            executor.release()
        blocking.apply()
        return result

    return behavior


_END = object()


def _next_or_end(iterator: Iterator[Any]) -> Any:
    return next(iterator, _END)


def _close_quietly(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):  # a generator's cleanup must not raise here
            close()


def blocking_stream(
    function: Callable[[Any, Any], Iterator[Any]], executor: RpcExecutor
) -> Callable[..., AsyncIterator[Any]]:
    """The ``grpc.aio`` streaming behavior that iterates ``function(request, context)``
    in the pool, one ``next()`` at a time (no thread is held while a message is sent)."""

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if not executor.admit():
            await _refuse(executor, context)
        blocking = BlockingContext(context)
        iterator: Iterator[Any] | None = None
        last: Future[Any] | None = None

        async def step(call: Callable[..., Any], *args: Any) -> Any:
            nonlocal last
            token, last = executor.submit(call, *args)
            return await executor.wait(token, last)

        try:
            iterator = iter(await step(function, request, blocking))
            while True:
                item = await step(_next_or_end, iterator)
                if item is _END:
                    break
                yield item
        except Aborted as aborted:
            await context.abort(aborted.code, aborted.details, blocking.trailing_metadata())
        except (asyncio.CancelledError, GeneratorExit):
            blocking.cancelled = True
            raise
        finally:
            executor.release()
            if iterator is not None:  # after a next() still running in a thread, if any
                done = iterator
                executor.after(last, lambda: _close_quietly(done))
        blocking.apply()

    return behavior
