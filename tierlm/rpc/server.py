"""The gRPC server: both services on the HTTP server's event loop, bound to `--grpc-port`.

Messages are capped at the HTTP body limit. The port is exclusive (gRPC's default
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


async def start(state: ServerState, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", limits.MAX_BODY_BYTES),
                                      ("grpc.max_send_message_length", 64 * limits.MAX_BODY_BYTES)])
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
