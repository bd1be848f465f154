"""Transport security for both servers and the CLI clients: TLS, mTLS and bearer tokens.

* TLS: ``--tls-cert`` / ``--tls-key`` (env ``NEURON_SERVE_TLS_CERT`` / ``_KEY``).
* mTLS: additionally ``--tls-client-ca`` (env ``NEURON_SERVE_TLS_CLIENT_CA``): clients must present
  a certificate signed by that CA, checked in the TLS handshake.
* Bearer tokens: ``--auth-token-file`` (one token per line, ``#`` comments) or env
  ``NEURON_SERVE_AUTH_TOKENS`` (comma-separated). Every RPC except health checks and (by default)
  reflection must carry ``authorization: Bearer <token>``; tokens are compared in constant time. The
  exec server's HTTP front (``--http-port``) takes the same tokens and the same TLS settings.
* A plaintext health-only port (``--health-port``, env ``NEURON_SERVE_HEALTH_PORT``) lets
  Kubernetes' native gRPC probes, which cannot speak TLS, reach grpc.health.v1 when TLS is on.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


class SecurityConfigError(ValueError):
    """A TLS or auth setting that cannot work (missing file, half a key pair, empty token file)."""


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read {what} {p}: {e.strerror}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {p} is empty")
    return data


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set = mTLS: client certificates required

    @classmethod
    def from_options(
        cls, cert: str | None = None, key: str | None = None, client_ca: str | None = None
    ) -> TLSConfig | None:
        """From flags, falling back to the environment (the Helm chart sets the env vars)."""
        cert = cert or os.environ.get("NEURON_SERVE_TLS_CERT") or None
        key = key or os.environ.get("NEURON_SERVE_TLS_KEY") or None
        client_ca = client_ca or os.environ.get("NEURON_SERVE_TLS_CLIENT_CA") or None
        if not cert and not key:
            if client_ca:
                raise SecurityConfigError("a client CA (mTLS) needs a server certificate and key too")
            return None
        if not cert or not key:
            raise SecurityConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        return cls(cert, key, client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        key, cert = _read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate")
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def load_tokens(token_file: str | None = None) -> tuple[bytes, ...]:
    """Accepted bearer tokens from a file (one per line) or ``NEURON_SERVE_AUTH_TOKENS``."""
    tokens: list[str] = []
    path = token_file or os.environ.get("NEURON_SERVE_AUTH_TOKEN_FILE") or None
    if path:
        text = _read(path, "token file").decode()
        tokens += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not tokens:
            raise SecurityConfigError(f"token file {path} holds no tokens")
    env = os.environ.get("NEURON_SERVE_AUTH_TOKENS", "")
    tokens += [t.strip() for t in env.split(",") if t.strip()]
    for t in tokens:
        if len(t) < 16:
            raise SecurityConfigError("bearer tokens must be at least 16 characters long")
    return tuple(t.encode() for t in tokens)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts."""

    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def bearer_token_valid(header: str | bytes | None, tokens: Sequence[bytes]) -> bool:
    """Whether an ``authorization`` value is ``Bearer <one of tokens>`` (the gRPC interceptor's and the
    HTTP front's one check), compared in constant time."""
    if not header:
        return False
    value = header.encode() if isinstance(header, str) else header
    if value[:7].lower() != b"bearer ":
        return False
    given = value[7:].strip()
    ok = False
    for t in tokens:  # no early exit: the time taken does not reveal which token matched
        ok |= hmac.compare_digest(given, t)
    return ok


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, tokens: Sequence[bytes], allow_reflection: bool = True) -> None:
        if not tokens:
            raise SecurityConfigError("bearer-token auth needs at least one token")
        self._tokens = tuple(tokens)
        self._exempt = (HEALTH_PREFIX, *(REFLECTION_PREFIXES if allow_reflection else ()))

    def _valid(self, header: str | bytes | None) -> bool:
        return bearer_token_valid(header, self._tokens)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        md = handler_call_details.invocation_metadata or ()
        header = next((v for k, v in md if k == "authorization"), None)
        if self._valid(header):
            return handler
        return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


# ---------------------------------------------------------------------------------------------
# Clients (CLI, tests)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    ca_file: str | None = None  # TLS: verify the server against this CA (None = insecure channel)
    cert_file: str | None = None  # mTLS client certificate
    key_file: str | None = None
    token: str | None = None  # bearer token
    server_name: str | None = None  # TLS name override (e.g. when dialing an IP)

    @classmethod
    def from_options(cls, ca=None, cert=None, key=None, token=None, token_file=None, server_name=None):
        token = token or os.environ.get("NEURON_SERVE_TOKEN") or None
        if token_file:
            token = _read(token_file, "token file").decode().strip().splitlines()[0].strip()
        if bool(cert) != bool(key):
            raise SecurityConfigError("a client certificate needs its key too (--tls-cert and --tls-key)")
        return cls(ca, cert, key, token, server_name)

    def channel(self, target: str) -> grpc.aio.Channel:
        if not self.ca_file:
            return grpc.aio.insecure_channel(target)
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA"),
            private_key=_read(self.key_file, "TLS key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "TLS certificate") if self.cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(target, creds, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
