"""Exceptions → gRPC status codes: one map per service, applied to every RPC in one place.

A servicer method never calls ``context.abort`` itself: it raises, and the handler wrapper that
:func:`shared.grpc_util.add_service` installs turns the exception into a status with
:meth:`ErrorMap.status` (the first rule whose exception type matches wins) and reports the code to
the service's metrics hook. ``RpcError`` carries its own code, for errors a service decides on
directly (draining, loading, queue full). Anything no rule names is INTERNAL, logged with its
traceback, with the exception's type and message in the details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


class RpcError(Exception):
    """An error meant for the client, with the status code it is answered with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unavailable(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.UNAVAILABLE, message)


@dataclass(frozen=True)
class ErrorMap:
    """``rules``: (exception type, status code) pairs, most specific first."""

    rules: Sequence[tuple[type[BaseException], grpc.StatusCode]] = ()

    def status(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, RpcError):
            return exc.code, exc.message
        for kind, code in self.rules:
            if isinstance(exc, kind):
                return code, _message(exc)
        log.error("unexpected error in an RPC", exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _message(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument; every other message is used as it is
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


StatusHook = Callable[[grpc.StatusCode], None]
