"""The gRPC server: both services on the HTTP server's event loop, bound to `--grpc-port`.

Requests are capped at the HTTP body limit, replies at 128 MiB (2,048 vectors of 16k floats). The port is exclusive (gRPC's default
SO_REUSEPORT would let a second server share it silently).
"""

from __future__ import annotations

import grpc

from tierlm.rpc.generation import Generation
from tierlm.rpc.oip import InferenceService
from tierlm.rpc.proto import generate_pb2_grpc, oip_v2_pb2_grpc
from tierlm.server import limits
from tierlm.server.state import ServerState


class BindError(RuntimeError):
    pass


async def start(state: ServerState, host: str, port: int, max_calls: int) -> grpc.aio.Server:
    """Both services listening on host:port; past `max_calls` calls at once (the HTTP
    server's --max-connections) new ones get RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(maximum_concurrent_rpcs=max_calls, options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", limits.MAX_BODY_BYTES),
                                      ("grpc.max_send_message_length", 128 * 2**20)])
    oip_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    generate_pb2_grpc.add_GenerationServicer_to_server(Generation(state), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises when the port cannot be bound
        raise BindError(f"cannot listen for gRPC on {address}: {e}") from None
    if bound == 0:
        raise BindError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server
