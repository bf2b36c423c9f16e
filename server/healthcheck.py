"""The container's HEALTHCHECK: is the gRPC server here SERVING?

    python -m server.healthcheck [--address localhost:50051] [--tls-ca ca.pem]

Exits 0 when `grpc.health.v1.Health/Check` says SERVING, 1 otherwise. It reads
the server's own environment (PORT, TLS_CERT, TLS_CA): with TLS_CERT set it
checks over TLS, trusting TLS_CA or else the server's certificate itself, so
the container's HEALTHCHECK works in both modes. Health needs no API key. In
the RunPod mode no gRPC server runs (RunPod watches its workers itself), so it
exits 0 when the container's main process is the RunPod handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main_process_is_runpod_worker(cmdline: Path = Path("/proc/1/cmdline")) -> bool:
    try:
        return b"runpod_handler" in cmdline.read_bytes()
    except OSError:
        return False


def _channel(address: str, tls_ca: str | None, server_name: str | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str, service: str = "", timeout: float = 3.0, tls_ca: str | None = None, server_name: str | None = None
) -> bool:
    """True when the server at `address` says SERVING (over TLS when `tls_ca` is given)."""
    with _channel(address, tls_ca, server_name) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = environ if environ is not None else {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=f"localhost:{environ.get('PORT', '50051')}")
    parser.add_argument("--service", default="", help="'' for the whole server, or dinov2.v1.Embed")
    parser.add_argument("--tls-ca", default=environ.get("TLS_CA") or environ.get("TLS_CERT"),
                        help="PEM CA to trust: TLS is used when given [TLS_CA, else TLS_CERT]")  # fmt: skip
    parser.add_argument("--tls-server-name", default=environ.get("TLS_SERVER_NAME"),
                        help="name the certificate is for, when not the address's host [TLS_SERVER_NAME]")  # fmt: skip
    args = parser.parse_args(argv)
    if main_process_is_runpod_worker():
        return 0
    serving = check(args.address, args.service, tls_ca=args.tls_ca, server_name=args.tls_server_name)
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
