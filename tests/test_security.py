"""TLS, mTLS and bearer-token auth on a real grpc.aio server (the shared plumbing both services
use), with a CA and certificates the test makes itself."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prep_service.server import PrepServer
from protos import prep_pb2, prep_pb2_grpc
from shared.grpc_util import ServerSecurity
from shared.security import ClientSecurity, SecurityConfigError, TLSConfig, load_tokens
from tests.test_prep_server import FakePrepare

TOKEN = "s3cret-token-0123456789"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, san: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, obj) -> str:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        data = obj.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    else:
        data = obj.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    other_ca = _cert("other-ca", other_key, "other-ca", other_key, ca=True)
    srv_key, cli_key, bad_key = _key(), _key(), _key()
    return {
        "ca": _write(d / "ca.pem", ca),
        "server_cert": _write(
            d / "server.pem", _cert("localhost", srv_key, "test-ca", ca_key, ca=False, san=True)
        ),
        "server_key": _write(d / "server.key", srv_key),
        "client_cert": _write(d / "client.pem", _cert("client", cli_key, "test-ca", ca_key, ca=False)),
        "client_key": _write(d / "client.key", cli_key),
        "bad_cert": _write(d / "bad.pem", _cert("intruder", bad_key, "other-ca", other_key, ca=False)),
        "bad_key": _write(d / "bad.key", bad_key),
        "other_ca": _write(d / "other_ca.pem", other_ca),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _list(client: ClientSecurity, port: int):
    async with client.channel(f"127.0.0.1:{port}") as ch:
        stub = prep_pb2_grpc.PrepServiceStub(ch)
        return await stub.ListOperations(
            prep_pb2.ListOperationsRequest(), metadata=client.metadata, timeout=5
        )


def _with_server(security: ServerSecurity, body):
    async def main():
        server = PrepServer(prepare=FakePrepare(), security=security)
        port = await server.start()
        try:
            return await body(port)
        finally:
            await server.stop()

    return asyncio.run(asyncio.wait_for(main(), 60))


async def _status(coro) -> grpc.StatusCode:
    try:
        await coro
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


def test_tls(pki) -> None:
    sec = ServerSecurity(tls=TLSConfig(pki["server_cert"], pki["server_key"]))

    async def body(port):
        ok = await _status(_list(ClientSecurity(ca_file=pki["ca"]), port))
        plain = await _status(_list(ClientSecurity(), port))
        wrong_ca = await _status(_list(ClientSecurity(ca_file=pki["other_ca"]), port))
        return ok, plain, wrong_ca

    ok, plain, wrong_ca = _with_server(sec, body)
    assert ok == grpc.StatusCode.OK
    assert plain == grpc.StatusCode.UNAVAILABLE and wrong_ca == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(pki) -> None:
    sec = ServerSecurity(tls=TLSConfig(pki["server_cert"], pki["server_key"], pki["ca"]))

    async def body(port):
        good = ClientSecurity(ca_file=pki["ca"], cert_file=pki["client_cert"], key_file=pki["client_key"])
        none = ClientSecurity(ca_file=pki["ca"])
        bad = ClientSecurity(ca_file=pki["ca"], cert_file=pki["bad_cert"], key_file=pki["bad_key"])
        return [await _status(_list(c, port)) for c in (good, none, bad)]

    good, none, bad = _with_server(sec, body)
    assert good == grpc.StatusCode.OK
    assert none == grpc.StatusCode.UNAVAILABLE and bad == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_and_exempt_health(pki) -> None:
    sec = ServerSecurity(tokens=(TOKEN.encode(),))

    async def body(port):
        res = {
            "right": await _status(_list(ClientSecurity(token=TOKEN), port)),
            "missing": await _status(_list(ClientSecurity(), port)),
            "wrong": await _status(_list(ClientSecurity(token=TOKEN[:-1] + "X"), port)),
        }
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            res["health"] = h.status
            stub = prep_pb2_grpc.PrepServiceStub(ch)
            res["watch"] = await _status(
                stub.WatchOperation(prep_pb2.WatchOperationRequest(operation_id="x")).read()
            )
        return res

    res = _with_server(sec, body)
    assert res["right"] == grpc.StatusCode.OK
    assert res["missing"] == res["wrong"] == grpc.StatusCode.UNAUTHENTICATED
    assert res["watch"] == grpc.StatusCode.UNAUTHENTICATED  # server-streaming RPCs are guarded too
    assert res["health"] == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_health_port_with_tls(pki) -> None:
    hp = _free_port()
    sec = ServerSecurity(tls=TLSConfig(pki["server_cert"], pki["server_key"], pki["ca"]), health_port=hp)

    async def body(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{hp}") as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="neuronserve.prep.v1.PrepService"), timeout=5
            )
            other = await _status(
                prep_pb2_grpc.PrepServiceStub(ch).ListOperations(prep_pb2.ListOperationsRequest(), timeout=5)
            )
        return h.status, other

    status, other = _with_server(sec, body)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert other == grpc.StatusCode.UNIMPLEMENTED  # the health port serves nothing else


def test_config_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(SecurityConfigError, match="both a certificate and a key"):
        TLSConfig.from_options(cert="x.pem")
    with pytest.raises(SecurityConfigError, match="client CA"):
        TLSConfig.from_options(client_ca="ca.pem")
    with pytest.raises(SecurityConfigError, match="cannot read TLS key"):
        TLSConfig(str(tmp_path / "nope.pem"), str(tmp_path / "nope.key")).server_credentials()
    (tmp_path / "tokens").write_text("# only a comment\n")
    with pytest.raises(SecurityConfigError, match="holds no tokens"):
        load_tokens(str(tmp_path / "tokens"))
    (tmp_path / "tokens").write_text("short\n")
    with pytest.raises(SecurityConfigError, match="at least 16"):
        load_tokens(str(tmp_path / "tokens"))
    monkeypatch.setenv("NEURON_SERVE_AUTH_TOKENS", f"{TOKEN},another-token-abcdefgh")
    assert load_tokens() == (TOKEN.encode(), b"another-token-abcdefgh")
    monkeypatch.setenv("NEURON_SERVE_TLS_CERT", "/c.pem")
    monkeypatch.setenv("NEURON_SERVE_TLS_KEY", "/k.pem")
    assert TLSConfig.from_options() == TLSConfig("/c.pem", "/k.pem", None)
