"""Request ids and per-RPC metrics for every call the server answers.

:class:`ObservabilityInterceptor` wraps the handler of each RPC — the
imago.v1 services and also health checks and reflection, so that failing
probes and grpcurl traffic show up in the same figures under their own
``service`` label. For each call it

- picks a request id: the client's ``x-request-id`` metadata value when that
  is a sane token (:data:`REQUEST_ID_PATTERN`), else a fresh uuid4 hex;
- makes it the context's request id (:func:`current_request_id`), which log
  records and the dispatcher's tickets pick up, and the client's connection
  the context's flow (:func:`~imago.server.fairness.current_flow`), by which
  a model's queue is shared fairly;
- sends it back at once as initial metadata ``x-request-id``, so that the
  client has it on errors and before a stream's first message;
- when the call has ended, records ``imago_requests_total`` and
  ``imago_request_duration_seconds`` with the final status code, and logs the
  call at DEBUG (WARNING for INTERNAL and UNKNOWN, the codes of bugs).

The final code is worked out by :func:`final_code` from how the behaviour
ended; grpc.aio calls the context's done callbacks once the call is over,
including when a client's cancellation interrupts the server between two
writes of a stream, where the behaviour itself never sees an exception.

Methods grpc does not know are answered UNIMPLEMENTED by grpc without a
handler, so they are neither counted nor given an id; synchronous behaviours
(which this server does not have) are passed through untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from imago.server.errors import RequestError, abort
from imago.server.fairness import set_flow
from imago.server.metrics import Metrics
from imago.workers.contract.logs import current_request_id, set_request_id

__all__ = [
    "REQUEST_ID_HEADER",
    "ObservabilityInterceptor",
    "current_request_id",
    "final_code",
    "request_id_from",
]

log = logging.getLogger("imago.rpc")

#: Metadata key a client may send its own request id in, and that the
#: server's id comes back in.
REQUEST_ID_HEADER = "x-request-id"
#: What a client-sent request id must look like to be used: short, and safe in
#: log lines, file names and URLs.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Codes that mean a bug rather than a client's or the server's situation.
BUG_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def request_id_from(metadata) -> str:
    """The request id for a call with invocation ``metadata`` ((key, value)
    pairs, or None): the client's ``x-request-id`` when it is a sane token,
    else a new uuid4 hex."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if REQUEST_ID_PATTERN.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex


def final_code(
    outcome: BaseException | None,
    completed: bool,
    set_code: grpc.StatusCode | None,
    deadline_passed: bool,
) -> grpc.StatusCode:
    """The status a call ended with.

    ``outcome`` is what the behaviour raised (None when nothing),
    ``completed`` whether it returned or its stream ran out, ``set_code`` the
    code it gave through ``context.abort`` or ``context.set_code`` (None when
    none) and ``deadline_passed`` whether the call's deadline is behind us.
    """
    raised = None if outcome is None else type(outcome)
    return _final_code(raised, completed, set_code, deadline_passed)


def _final_code(
    raised: type[BaseException] | None,
    completed: bool,
    set_code: grpc.StatusCode | None,
    deadline_passed: bool,
) -> grpc.StatusCode:
    """:func:`final_code` from the class of what the behaviour raised: all it
    depends on, and all that a call's record keeps (see :class:`_Call`)."""
    if raised is not None and issubclass(raised, grpc.aio.AbortError):
        return set_code or grpc.StatusCode.UNKNOWN
    cancelled = raised is not None and issubclass(raised, asyncio.CancelledError)
    if cancelled or (raised is None and not completed):
        # grpc cancels the behaviour when the client cancels or goes away, and
        # when the deadline passes; a stream may also be stopped between writes.
        return grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed else grpc.StatusCode.CANCELLED
    if raised is not None:
        # As grpc.aio answers it: the code set before the exception, else UNKNOWN.
        if set_code is not None and set_code != grpc.StatusCode.OK:
            return set_code
        return grpc.StatusCode.UNKNOWN
    return set_code or grpc.StatusCode.OK


def _status_code(code) -> grpc.StatusCode | None:
    """``context.code()`` as a StatusCode (it holds whatever was passed in)."""
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


def _drop_tracebacks(error: grpc.aio.AbortError) -> None:
    """Drop the tracebacks of an AbortError and of the exceptions it was
    raised while handling (its ``__cause__`` and ``__context__`` chain).

    ``context.abort`` keeps the AbortError it raises in the call's state until
    that state is freed, to check that the behaviour ends with that very error.
    The error's traceback, and those of its chain (the RequestError that
    ``errors.abort`` turned into a status, say), hold the frames it went through;
    those frames hold the context, and the context holds the call's state: a
    reference cycle, which keeps the frames, and the request in them, until
    the cyclic garbage collector runs. For a large rejected request that is
    a lot of memory held for no use. Nothing reads these tracebacks: grpc ends
    a call that raised its AbortError without logging anything.
    """
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


@dataclass(frozen=True)
class _Undecodable:
    """Request bytes that did not parse as the method's request message."""

    reason: str


@dataclass
class _Call:
    """One call's record, from its start to its final status.

    It keeps what the behaviour raised only as its class and repr, never the
    exception itself: the exception's traceback holds the frame of the
    wrapper, whose ``call`` is this record, so keeping it would make a cycle
    through every frame of the failed call, the request with them, which only
    the cyclic garbage collector frees. A large rejected request would then
    stay in memory long after its call.
    """

    service: str
    method: str
    request_id: str
    # time.perf_counter() when the behaviour was entered, in seconds.
    started: float = field(default_factory=time.perf_counter)
    # The class of what the behaviour raised and its repr; None and "" when nothing.
    raised: type[BaseException] | None = None
    raised_repr: str = ""
    completed: bool = False

    def ended_by(self, error: BaseException) -> None:
        """Note that the behaviour raised ``error``."""
        self.raised = type(error)
        self.raised_repr = repr(error)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, request metrics and a log line for every RPC."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        request_id = request_id_from(handler_call_details.invocation_metadata)
        # Interceptors further in and the behaviour run in this same context,
        # so their log lines carry the id too.
        set_request_id(request_id)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        service, _, name = method.lstrip("/").rpartition("/")
        return self._wrap(handler, service, name, request_id)

    # ------------------------------------------------------------ internals

    def _wrap(
        self, handler: grpc.RpcMethodHandler, service: str, method: str, request_id: str
    ) -> grpc.RpcMethodHandler:
        """``handler`` with its behaviour wrapped: the id is sent first, and how
        the behaviour ends is noted for :meth:`_finished`."""
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        if streaming_in:
            behaviour = handler.stream_stream if streaming_out else handler.stream_unary
        else:
            behaviour = handler.unary_stream if streaming_out else handler.unary_unary

        deserialize = handler.request_deserializer

        def parse(data: bytes):
            # grpc answers a deserializer's exception with UNKNOWN and logs a
            # traceback; bytes that are not the request message are the
            # client's mistake, so the behaviour answers them (see refuse).
            try:
                return deserialize(data) if deserialize else data
            except Exception as error:
                return _Undecodable(f"{error}")

        async def refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
            why = f"the request is not a valid {service} {method} message ({request.reason})"
            await abort(context, RequestError(grpc.StatusCode.INVALID_ARGUMENT, why))

        async def first_check(request, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                await refuse(context, request)

        async def checked(requests, context: grpc.aio.ServicerContext):
            """A request stream that ends the call at its first undecodable item."""
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await refuse(context, request)
                yield request

        async def begin(context: grpc.aio.ServicerContext) -> _Call:
            call = _Call(service, method, request_id)
            set_request_id(request_id)
            # The connection is the client's flow in its model's fair queue.
            set_flow(context.peer())
            context.add_done_callback(lambda ctx: self._finished(call, ctx))
            try:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            except Exception:
                # Sending fails only once the call is over: the client left, its
                # deadline passed, or the server is stopping, which cancels
                # every call anyway. Ending as cancelled tells grpc just that
                # (it would log any other exception as a server error).
                call.ended_by(asyncio.CancelledError())
                raise asyncio.CancelledError() from None
            return call

        if inspect.isasyncgenfunction(behaviour):

            async def wrapped(request, context):
                call = await begin(context)
                try:
                    await first_check(request, context)
                except grpc.aio.AbortError as error:
                    call.ended_by(error)
                    _drop_tracebacks(error)
                    # This frame goes into the traceback again as the error
                    # leaves it: it must not hold the context (see
                    # _drop_tracebacks), nor the request.
                    del request, context
                    raise error
                except BaseException as error:
                    call.ended_by(error)
                    raise
                if streaming_in:
                    request = checked(request, context)
                responses = behaviour(request, context)
                try:
                    async for response in responses:
                        yield response
                    call.completed = True
                except GeneratorExit:
                    # grpc stopped reading: the call ended between two writes,
                    # which :func:`final_code` reads as cancelled.
                    raise
                except grpc.aio.AbortError as error:
                    call.ended_by(error)
                    _drop_tracebacks(error)
                    del request, context  # as above
                    raise error
                except BaseException as error:
                    call.ended_by(error)
                    raise
                finally:
                    # Run the behaviour's own clean-up now, not when it is collected.
                    await responses.aclose()

        elif inspect.iscoroutinefunction(behaviour):

            async def wrapped(request, context):
                call = await begin(context)
                try:
                    await first_check(request, context)
                    if streaming_in:
                        request = checked(request, context)
                    response = await behaviour(request, context)
                except grpc.aio.AbortError as error:
                    call.ended_by(error)
                    _drop_tracebacks(error)
                    # This frame goes into the traceback again as the error
                    # leaves it: it must not hold the context (see
                    # _drop_tracebacks), nor the request.
                    del request, context
                    raise error
                except BaseException as error:
                    call.ended_by(error)
                    raise
                call.completed = True
                return response

        else:
            return handler
        build = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(streaming_in, streaming_out)]
        return build(
            wrapped, request_deserializer=parse, response_serializer=handler.response_serializer
        )

    def _finished(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """The call is over: count it and log it."""
        seconds = time.perf_counter() - call.started
        remaining = context.time_remaining()
        code = _final_code(
            call.raised,
            call.completed,
            _status_code(context.code()),
            deadline_passed=remaining is not None and remaining <= 0,
        )
        if self._metrics is not None:
            self._metrics.request_finished(call.service, call.method, code.name, seconds)
        level = logging.WARNING if code in BUG_CODES else logging.DEBUG
        if log.isEnabledFor(level):
            why = ""
            if code is not grpc.StatusCode.OK:
                why = context.details() or call.raised_repr
            # Done callbacks run outside the call's context: name the request.
            log.log(
                level,
                "%s/%s %s in %.3fs%s",
                call.service,
                call.method,
                code.name,
                seconds,
                f": {why}" if why else "",
                extra={"request_id": call.request_id},
            )
