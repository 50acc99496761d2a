"""Probe a running service's gRPC health: exit 0 when it is SERVING, else 1.

::

    python -m noisescore.healthcheck                  # NOISESCORE_HEALTH_ADDR, else GRPC_ADDR
    python -m noisescore.healthcheck --addr 10.0.0.7:8081 --service noisescore.v1.NoiseScoring

The container image's ``HEALTHCHECK`` runs this. It imports grpc and nothing heavy, so a
check costs tens of milliseconds. It speaks plaintext, the way ``health_addr`` serves:
a service with TLS on its main port and no ``health_addr`` is checked with ``--tls``
(the system's trusted roots) or ``--tls-ca PEM`` (a private CA), plus
``--tls-server-name`` when the certificate does not name the address dialled. Health
checking is never behind bearer tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


def default_addr(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """Where to probe: ``NOISESCORE_HEALTH_ADDR``, else ``NOISESCORE_GRPC_ADDR``, else the
    service's default; a wildcard host is dialled on loopback."""
    env = os.environ if environ is None else environ
    addr = env.get("NOISESCORE_HEALTH_ADDR") or env.get("NOISESCORE_GRPC_ADDR") or ""
    addr = addr or "127.0.0.1:50051"
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"health check address {addr!r} is not host:port")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"{host}:{port}"


def check(
    addr: str,
    *,
    service: str = "",
    timeout: float = 3.0,
    root_certificates: bytes | None = None,
    tls: bool = False,
    server_name: str | None = None,
) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) of ``service`` at
    ``addr``. Raises ``grpc.RpcError`` when the server cannot be reached in time."""
    if tls or root_certificates is not None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        credentials = grpc.ssl_channel_credentials(root_certificates)
        channel = grpc.secure_channel(addr, credentials, options=options)
    else:
        channel = grpc.insecure_channel(addr)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="noisescore health",
        description="Exit 0 when the noisescore service at ADDR reports SERVING over "
        "grpc.health.v1, 1 when it does not or cannot be reached.",
    )
    p.add_argument("--addr", help="host:port (default $NOISESCORE_HEALTH_ADDR, else "
                   "$NOISESCORE_GRPC_ADDR, else 127.0.0.1:50051)")  # fmt: skip
    p.add_argument("--service", default="", help="service name to check ('' = the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's trusted roots")
    p.add_argument("--tls-ca", type=Path, help="TLS, trusting this CA certificate (PEM)")
    p.add_argument("--tls-server-name", help="name the server certificate must carry (TLS)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        addr = args.addr or default_addr()
        roots = args.tls_ca.read_bytes() if args.tls_ca else None
    except (ValueError, OSError) as err:
        print(f"noisescore health: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = check(
            addr, service=args.service, timeout=args.timeout, root_certificates=roots,
            tls=args.tls, server_name=args.tls_server_name,
        )  # fmt: skip
    except grpc.RpcError as err:
        code = err.code().name if err.code() else "UNKNOWN"  # type: ignore[attr-defined]
        if not args.quiet:
            print(f"{addr}: unhealthy ({code}: {err.details()})", file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_UNHEALTHY
    if not args.quiet:
        print(f"{addr}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
