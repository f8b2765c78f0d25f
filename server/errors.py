"""gRPC errors with rich details (google.rpc.BadRequest, RetryInfo).

Everything that turns a request away raises :class:`RequestError`; the
servicers turn it into a status with :func:`abort`, or into an ``ItemError``
inside bulk streams.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from imago.v1 import common_pb2
from imago.workers.contract.protocol import Failed


@dataclass
class RequestError(Exception):
    """A request that ends with a gRPC status instead of a result."""

    code: grpc.StatusCode
    message: str
    # Request field at fault, as a dotted path ("generation.top_p").
    field: str = ""
    # Seconds after which a retry may succeed (RESOURCE_EXHAUSTED, UNAVAILABLE).
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_status(self) -> grpc.Status:
        details = []
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after_s * 1000))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(code=self.code.value[0], message=str(self), details=details)
        return rpc_status.to_status(status)

    def to_item_error(self) -> common_pb2.ItemError:
        return common_pb2.ItemError(code=self.code.value[0], message=str(self), field=self.field)


def invalid(field: str, message: str) -> RequestError:
    """INVALID_ARGUMENT for ``field``."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def from_failure(failure: Failed) -> RequestError:
    """The RequestError for a worker's Failed message."""
    code = getattr(grpc.StatusCode, failure.code, grpc.StatusCode.INTERNAL)
    return RequestError(code, failure.message, failure.field)


async def abort(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    """End the RPC with ``error``'s status and details. Never returns.

    A call whose deadline has passed was already ended by gRPC itself, and
    sending a status then fails: such a call leaves as cancelled instead of
    logging a servicer error nobody can act on.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise asyncio.CancelledError(str(error))
    try:
        await context.abort_with_status(error.to_status())
    except grpc.aio.AbortError:
        raise  # the status went out: the normal way to end the call
    except Exception as exc:
        # The deadline passed (or the client left) while the status was on its way.
        raise asyncio.CancelledError(str(error)) from exc


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
