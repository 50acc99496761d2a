"""Server interceptors: bearer-token auth, RPC metrics, and no stack traces to clients.

:func:`noisescore.service.server.build_server` installs them on the asyncio server,
outermost first::

    MetricsInterceptor -> AuthInterceptor -> ErrorInterceptor -> the handler

so every call is counted (auth rejections included, as ``UNAUTHENTICATED``), and an
unexpected exception has already become ``INTERNAL`` when the metrics see it.

They wrap ``grpc.aio`` behaviors of every shape: coroutines (unary responses, and
streaming handlers that ``await context.write(...)`` like the health service's ``Watch``)
and async generators (streamed responses). The servicer's blocking methods reach them as
such behaviors too: :mod:`noisescore.service.executor` runs those in the RPC thread pool.
A handler's own ``context.abort(code, message)`` or ``context.set_code(code)`` is left as
it is.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc

from noisescore.service.metrics import UNKNOWN_METHOD, ServiceMetrics

__all__ = [
    "HEALTH_PREFIX",
    "MISSING_TOKEN",
    "WRONG_TOKEN",
    "AuthInterceptor",
    "ErrorInterceptor",
    "MetricsInterceptor",
]

_LOG = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
MISSING_TOKEN = "missing bearer token: send metadata 'authorization: Bearer <token>'"
WRONG_TOKEN = "invalid bearer token"

Behavior = Callable[..., Any]
# (behavior, response_streaming) -> the behavior to install instead
Wrapper = Callable[[Behavior, bool], Behavior]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _replace_behavior(handler: grpc.RpcMethodHandler, wrap: Wrapper) -> grpc.RpcMethodHandler:
    """The same handler (shape, (de)serializers) with its behavior passed through ``wrap``."""
    attribute, factory = _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = wrap(getattr(handler, attribute), bool(handler.response_streaming))
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _check_async(behavior: Behavior) -> None:
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        raise TypeError(
            f"{behavior!r} is not a coroutine or async generator function: register blocking "
            "handlers through noisescore.service.servicer.add_servicer (it runs them in the "
            "RPC thread pool)"
        )


def _was_aborted(error: BaseException) -> bool:
    """True when ``error`` is how ``await context.abort()`` ends a handler."""
    return isinstance(error, grpc.aio.AbortError)


# --------------------------------------------------------------------------- auth


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata matching one of ``tokens``.

    With no tokens every call passes (authentication off). Methods under
    ``exempt_prefixes`` (health checking, by default: probes carry no secrets) always pass.
    Server reflection is *not* exempt: it needs a token like the service's own methods.
    A call to a method the server does not have gets ``UNIMPLEMENTED`` either way.
    A rejected call never reaches the RPC thread pool.
    """

    def __init__(
        self, tokens: Sequence[str], *, exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)
    ) -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)
        self._exempt = tuple(exempt_prefixes)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self._tokens:
            return handler
        if handler_call_details.method.startswith(self._exempt):
            return handler
        problem = self._check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler

        async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return _replace_behavior(handler, lambda _behavior, _streaming: reject)

    def _check(self, metadata: Sequence[tuple[str, Any]]) -> str | None:
        """None when a bearer token matches, else the message to abort with."""
        presented: list[bytes] = []
        for key, value in metadata:
            if key.lower() != "authorization":
                continue
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                presented.append(credential.strip().encode())
        if not presented:
            return MISSING_TOKEN
        # Compare against every token (no early exit) in constant time per comparison.
        matches = [hmac.compare_digest(p, t) for p in presented for t in self._tokens]
        return None if any(matches) else WRONG_TOKEN


# --------------------------------------------------------------------------- errors


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turn an unexpected exception in a handler into ``INTERNAL`` with a generic message.

    The client gets ``"internal error; see the server log (request id <id>)"`` and nothing
    of the exception; the server log gets the method, the same request id and the
    traceback. Without this grpc would answer ``UNKNOWN`` with the exception's text.
    Aborts (``context.abort``) pass through unchanged.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or _LOG

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return _replace_behavior(handler, lambda b, streaming: self._wrap(method, b, streaming))

    async def _internal(
        self, method: str, error: BaseException, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        request_id = uuid.uuid4().hex[:16]
        self._log.error(
            "unexpected error in %s (request id %s)", method, request_id, exc_info=error
        )
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error; see the server log (request id {request_id})",
        )
        raise AssertionError("context.abort returned")  # it raises; for type checkers

    def _wrap(self, method: str, behavior: Behavior, streaming: bool) -> Behavior:
        _check_async(behavior)
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                try:
                    async for response in behavior(request, context):
                        yield response
                except Exception as error:
                    if _was_aborted(error):
                        raise
                    await self._internal(method, error, context)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                result = await behavior(request, context)
            except Exception as error:
                if _was_aborted(error):
                    raise
                await self._internal(method, error, context)
            if not streaming and result is None and context.code() is None:
                # grpc would answer "Failed to serialize response"
                error = TypeError(f"{method} returned None, not a message")
                await self._internal(method, error, context)
            return result

        return call


# --------------------------------------------------------------------------- metrics


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose handler finished without raising."""
    code = context.code()
    return code if code is not None else grpc.StatusCode.OK  # set_code() by the handler


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Count every call by full method name and final status code, and time it (from the
    call's arrival; for a streamed response, until the stream ends) into ``metrics``.
    A call whose client went away (or whose deadline passed) first counts as CANCELLED."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        start = time.perf_counter()
        handler = await continuation(handler_call_details)
        if handler is None:  # grpc answers UNIMPLEMENTED
            self._metrics.observe_rpc(
                UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name, time.perf_counter() - start
            )
            return None
        method = handler_call_details.method

        def record(code: grpc.StatusCode | None) -> None:
            name = (code or grpc.StatusCode.UNKNOWN).name
            self._metrics.observe_rpc(method, name, time.perf_counter() - start)

        return _replace_behavior(handler, lambda b, streaming: self._wrap(b, record))

    @staticmethod
    def _wrap(behavior: Behavior, record: Callable[[grpc.StatusCode | None], None]) -> Behavior:
        _check_async(behavior)
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                recorded = False
                try:
                    async for response in behavior(request, context):
                        yield response
                except (asyncio.CancelledError, GeneratorExit):  # the client went away
                    recorded = True
                    record(grpc.StatusCode.CANCELLED)
                    raise
                except BaseException:
                    recorded = True
                    record(context.code())  # set by abort (or by ErrorInterceptor: INTERNAL)
                    raise
                finally:
                    if not recorded:
                        record(_final_code(context))

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                result = await behavior(request, context)
            except asyncio.CancelledError:
                record(grpc.StatusCode.CANCELLED)
                raise
            except BaseException:
                record(context.code())
                raise
            record(_final_code(context))
            return result

        return call
