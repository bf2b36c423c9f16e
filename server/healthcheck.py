"""The container's HEALTHCHECK: is the gRPC server here SERVING?

    python -m server.healthcheck [--address localhost:50051]

Exits 0 when `grpc.health.v1.Health/Check` says SERVING, 1 otherwise. In the
RunPod mode no gRPC server runs (RunPod watches its workers itself), so it
exits 0 when the container's main process is the RunPod handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main_process_is_runpod_worker(cmdline: Path = Path("/proc/1/cmdline")) -> bool:
    try:
        return b"runpod_handler" in cmdline.read_bytes()
    except OSError:
        return False


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--service", default="", help="'' for the whole server, or dinov2.v1.Embed")
    args = parser.parse_args(argv)
    if main_process_is_runpod_worker():
        return 0
    serving = check(args.address, args.service)
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
