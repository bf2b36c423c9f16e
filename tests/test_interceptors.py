"""Security and request ids: API key, TLS, x-request-id, and what logs must never hold."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from server import healthcheck
from tests import images
from tests.test_call_logs import CallTasks, noisy

KEY = "s3cret-key-0123456789"
SERVING = health_pb2.HealthCheckResponse.SERVING


def one_image() -> pb.EmbedRequest:
    return pb.EmbedRequest(images=[pb.Image(data=images.png(), id="a")])


def test_api_key_is_required_except_for_health(make_server) -> None:
    server = make_server(api_key=KEY)
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", KEY),)]:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Embed(one_image(), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <key>" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(server.stub.EmbedStream(iter([one_image()]), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", f"Bearer {KEY}"),)
    assert server.stub.Embed(one_image(), metadata=good, timeout=10).embeddings[0].values
    (streamed,) = server.stub.EmbedStream(iter([one_image()]), metadata=good, timeout=10)
    assert streamed.embeddings[0].values
    status = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_exactly_one_authorization_entry_is_accepted(make_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_server(api_key=KEY)
    calls = CallTasks(server)
    good, wrong = ("authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong")
    for metadata in [(wrong, good), (good, wrong), (good, good)]:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Embed(one_image(), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "send exactly one 'authorization: Bearer <key>'" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub.EmbedStream(iter([one_image()]), metadata=metadata, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.stub.Embed(one_image(), metadata=(good,), timeout=10).embeddings[0].values
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), metadata=(wrong, wrong), timeout=5).status == SERVING
    assert len(calls.wait_all_finished()) == 8
    assert not noisy(caplog.records)


def test_request_id_is_echoed_or_made(server) -> None:
    _, call = server.stub.Embed.with_call(one_image(), metadata=(("x-request-id", "abc-123"),), timeout=10)
    assert dict(call.initial_metadata())["x-request-id"] == "abc-123"
    _, call = server.stub.Embed.with_call(one_image(), timeout=10)
    assert len(dict(call.initial_metadata())["x-request-id"]) == 16
    stream = server.stub.EmbedStream(iter([one_image()]), metadata=(("x-request-id", "s-1"),), timeout=10)
    assert dict(stream.initial_metadata())["x-request-id"] == "s-1"
    assert len(list(stream)) == 1


def test_health_watch_works_through_the_interceptors(make_server, caplog: pytest.LogCaptureFixture) -> None:
    """Watch writes its answers itself (it is no generator): the request-id wrapper must not iterate it."""
    caplog.set_level(logging.DEBUG)
    server = make_server(api_key=KEY)
    calls = CallTasks(server)
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == SERVING
    assert "x-request-id" in dict(watch.initial_metadata())
    watch.cancel()
    assert calls.wait_all_finished() == ["/grpc.health.v1.Health/Watch"]
    assert not noisy(caplog.records)


def test_logs_hold_neither_keys_nor_image_bytes(make_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_server(api_key=KEY)
    marker = b"IMAGEBYTESMARKER" * 8
    good = (("authorization", f"Bearer {KEY}"),)
    server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=marker)]), metadata=good, timeout=10)
    with pytest.raises(grpc.RpcError):
        server.stub.Embed(pb.EmbedRequest(), metadata=good, timeout=10)
    text = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert KEY not in text and "IMAGEBYTESMARKER" not in text
    assert KEY not in repr(server.server.settings)


def test_tls_serves_secure_clients_only(make_server, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server = make_server(tls_cert=str(cert), tls_key=str(key))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        assert stub.Embed(one_image(), timeout=10).embeddings[0].values
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Info(pb.InfoRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_healthcheck_works_under_tls(make_server, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server = make_server(tls_cert=str(cert), tls_key=str(key), api_key=KEY)
    env = {"PORT": str(server.port), "TLS_CERT": str(cert)}
    assert healthcheck.main([], env) == 0
    assert healthcheck.main(["--address", f"127.0.0.1:{server.port}"], env) == 0  # the cert names 127.0.0.1 too
    assert healthcheck.main([], {"PORT": str(server.port)}) == 1  # plaintext against a TLS port
