"""Hostile input through the real server: each bad image fails alone with a specific
INVALID_ARGUMENT message, every good image beside it is embedded correctly, the server
stays SERVING and its memory bounded."""

from __future__ import annotations

import os
import resource

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server_proc import process_tree, status_kb
from protos.dinov2.v1 import embed_pb2 as pb
from tests import bad_inputs, images
from tests.conftest import Reference, RunningServer, assert_close


@pytest.fixture(scope="module")
def strict_server(make_server_module) -> RunningServer:
    return make_server_module(max_image_bytes=bad_inputs.MAX_IMAGE_BYTES, max_image_pixels=bad_inputs.MAX_IMAGE_PIXELS)


def rss_peak_mb() -> float:
    """This process's peak and its children's (the in-process server's decode workers), in MB."""
    children = process_tree(os.getpid())[1:]
    hwm = sum(status_kb(pid, "VmHWM") for pid in children)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + hwm) / 1024


def test_every_bad_input_fails_alone_between_good_images(strict_server: RunningServer, reference: Reference) -> None:
    corpus = bad_inputs.corpus()
    assert len(corpus) >= 25
    good = [images.png(48, 48, seed=900), images.jpeg(80, 60, seed=901)]
    expected = [reference.embed(g) for g in good]
    peak_before = rss_peak_mb()
    for name, (data, phrase) in corpus.items():
        request = pb.EmbedRequest(
            images=[pb.Image(data=good[0], id="g0"), pb.Image(data=data, id=name), pb.Image(data=good[1], id="g1")]
        )
        response = strict_server.stub.Embed(request, timeout=60)
        g0, bad, g1 = response.embeddings
        assert bad.id == name and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], name
        assert phrase in bad.error.message, f"{name}: {bad.error.message!r}"
        assert not bad.values
        assert_close(np.array(g0.values, np.float32), expected[0], f"{name} good 0")
        assert_close(np.array(g1.values, np.float32), expected[1], f"{name} good 1")
    growth = rss_peak_mb() - peak_before
    assert growth < 300, f"peak memory grew by {growth:.0f} MB on bad inputs"
    status = health_pb2_grpc.HealthStub(strict_server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_inputs_in_a_stream_do_not_end_it(strict_server: RunningServer) -> None:
    corpus = bad_inputs.corpus()
    requests = [pb.EmbedRequest(images=[pb.Image(data=data, id=name)]) for name, (data, _) in corpus.items()]
    requests.append(pb.EmbedRequest(images=[pb.Image(data=images.png(), id="last-good")]))
    responses = list(strict_server.stub.EmbedStream(iter(requests), timeout=60))
    assert [r.embeddings[0].id for r in responses] == [*corpus, "last-good"]
    assert all(r.embeddings[0].error.code == 3 for r in responses[:-1])
    assert responses[-1].embeddings[0].values


def test_a_gif_with_thousands_of_frames_embeds_its_first_frame(
    strict_server: RunningServer, reference: Reference
) -> None:
    data = bad_inputs.many_frames_gif()
    response = strict_server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=data)]), timeout=30)
    assert_close(np.array(response.embeddings[0].values, np.float32), reference.embed(data), "gif")
