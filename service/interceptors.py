"""Server interceptors: bearer-token auth, RPC metrics, and no stack traces to clients.

:func:`noisescore.service.server.build_server` installs them outermost first::

    MetricsInterceptor -> AuthInterceptor -> ErrorInterceptor -> the servicer

so every call is counted (auth rejections included, as ``UNAUTHENTICATED``), and an
unexpected exception has already become ``INTERNAL`` when the metrics see it.

All three work for every handler shape (unary and streaming requests and responses, and
gRPC's non-blocking streaming handlers such as the health service's ``Watch``). A handler's
own ``context.abort(code, message)`` or ``context.set_code(code)`` is left as it is.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
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


def _non_blocking(behavior: Behavior) -> bool:
    """gRPC calls such a streaming behavior with a ``send_response_callback`` and ends the
    stream when it is called with None, not when the behavior returns."""
    return bool(getattr(behavior, "experimental_non_blocking", False))


def _mark_non_blocking(wrapper: Behavior, inner: Behavior) -> Behavior:
    wrapper.experimental_non_blocking = True  # type: ignore[attr-defined]
    wrapper.experimental_thread_pool = getattr(inner, "experimental_thread_pool", None)  # type: ignore[attr-defined]
    return wrapper


def _was_aborted(error: BaseException, context: grpc.ServicerContext) -> bool:
    """True when ``error`` is how ``context.abort()`` ends a handler: grpc sets the status
    on the context and raises a bare ``Exception()``."""
    code = context.code()
    return type(error) is Exception and code is not None and code != grpc.StatusCode.OK


# --------------------------------------------------------------------------- auth


class AuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata matching one of ``tokens``.

    With no tokens every call passes (authentication off). Methods under
    ``exempt_prefixes`` (health checking, by default: probes carry no secrets) always pass.
    Server reflection is *not* exempt: it needs a token like the service's own methods.
    A call to a method the server does not have gets ``UNIMPLEMENTED`` either way.
    """

    def __init__(
        self, tokens: Sequence[str], *, exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)
    ) -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)
        self._exempt = tuple(exempt_prefixes)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not self._tokens:
            return handler
        if handler_call_details.method.startswith(self._exempt):
            return handler
        problem = self._check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler

        def reject(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

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


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turn an unexpected exception in a handler into ``INTERNAL`` with a generic message.

    The client gets ``"internal error; see the server log (request id <id>)"`` and nothing
    of the exception; the server log gets the method, the same request id and the
    traceback. Without this grpc would answer ``UNKNOWN`` with the exception's text.
    Aborts (``context.abort``) pass through unchanged.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or _LOG

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return _replace_behavior(handler, lambda b, streaming: self._wrap(method, b, streaming))

    def _internal(self, method: str, error: Exception, context: grpc.ServicerContext) -> NoReturn:
        request_id = uuid.uuid4().hex[:16]
        self._log.error(
            "unexpected error in %s (request id %s)", method, request_id, exc_info=error
        )
        context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error; see the server log (request id {request_id})",
        )
        raise AssertionError("context.abort returned")  # it raises; for type checkers

    def _wrap(self, method: str, behavior: Behavior, streaming: bool) -> Behavior:
        if streaming and _non_blocking(behavior):

            def non_blocking(request: Any, context: grpc.ServicerContext, send: Any) -> None:
                try:
                    behavior(request, context, send)
                except Exception as error:
                    if _was_aborted(error, context):
                        raise
                    self._internal(method, error, context)

            return _mark_non_blocking(non_blocking, behavior)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                result = behavior(request, context)
            except Exception as error:
                if _was_aborted(error, context):
                    raise
                self._internal(method, error, context)
            if streaming:
                return self._guard(method, result, context)
            if result is None and context.code() is None:  # grpc would say "Failed to serialize"
                self._internal(method, TypeError(f"{method} returned None, not a message"), context)
            return result

        return call

    def _guard(self, method: str, responses: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from responses  # GeneratorExit (client gone) is not an Exception: it passes
        except Exception as error:
            if _was_aborted(error, context):
                raise
            self._internal(method, error, context)


# --------------------------------------------------------------------------- metrics


def _final_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose handler finished without raising."""
    code = context.code()
    if code is not None:
        return code  # set_code() by the handler
    if not context.is_active():
        return grpc.StatusCode.CANCELLED  # the client went away (or its deadline passed)
    return grpc.StatusCode.OK


class MetricsInterceptor(grpc.ServerInterceptor):
    """Count every call by full method name and final status code, and time it (from the
    call's arrival; for a streamed response, until the stream ends) into ``metrics``."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        start = time.perf_counter()
        handler = continuation(handler_call_details)
        if handler is None:  # grpc answers UNIMPLEMENTED
            self._metrics.observe_rpc(
                UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name, time.perf_counter() - start
            )
            return None
        method = handler_call_details.method

        def record(code: grpc.StatusCode | None) -> None:
            name = (code or grpc.StatusCode.UNKNOWN).name
            self._metrics.observe_rpc(method, name, time.perf_counter() - start)

        return _replace_behavior(handler, lambda b, streaming: self._wrap(b, streaming, record))

    def _wrap(
        self, behavior: Behavior, streaming: bool, record: Callable[[grpc.StatusCode | None], None]
    ) -> Behavior:
        if streaming and _non_blocking(behavior):
            return self._wrap_non_blocking(behavior, record)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                result = behavior(request, context)
            except BaseException:
                record(context.code())  # set by abort (or by ErrorInterceptor: INTERNAL)
                raise
            if streaming:
                return self._watch(result, context, record)
            record(_final_code(context))
            return result

        return call

    @staticmethod
    def _watch(
        responses: Any,
        context: grpc.ServicerContext,
        record: Callable[[grpc.StatusCode | None], None],
    ) -> Iterator[Any]:
        try:
            yield from responses
        except GeneratorExit:  # grpc dropped the stream: the client went away
            record(grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            record(context.code())
            raise
        record(_final_code(context))

    @staticmethod
    def _wrap_non_blocking(
        behavior: Behavior, record: Callable[[grpc.StatusCode | None], None]
    ) -> Behavior:
        def call(request: Any, context: grpc.ServicerContext, send: Any) -> None:
            recorded = False
            lock = threading.Lock()  # the end may be seen by two threads at once

            def finish(code: grpc.StatusCode | None) -> None:
                nonlocal recorded
                with lock:
                    first, recorded = not recorded, True
                if first:
                    record(code)

            # Registered before the handler's own callbacks, so it runs first when the
            # call ends without the handler having ended the stream: the client left.
            context.add_callback(lambda: finish(grpc.StatusCode.CANCELLED))

            def send_and_watch(response: Any) -> None:
                if response is None:  # the handler ends the stream
                    finish(context.code() or grpc.StatusCode.OK)
                send(response)

            try:
                behavior(request, context, send_and_watch)
            except BaseException:
                finish(context.code())
                raise

        return _mark_non_blocking(call, behavior)
