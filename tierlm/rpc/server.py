"""The gRPC server: both services on the HTTP server's event loop, bound to `--grpc-port`.

Requests are capped at the HTTP body limit, replies at 128 MiB (2,048 vectors of 16k floats). The port is exclusive (gRPC's default
SO_REUSEPORT would let a second server share it silently). A request that does not parse as
its message ends INVALID_ARGUMENT, not grpcio's UNKNOWN (`tolerant`, calls.Undecodable).
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from tierlm.rpc.calls import Undecodable
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
    registrar = _Registrar(server)
    oip_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), registrar)
    generate_pb2_grpc.add_GenerationServicer_to_server(Generation(state), registrar)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises when the port cannot be bound
        raise BindError(f"cannot listen for gRPC on {address}: {e}") from None
    if bound == 0:
        raise BindError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server


class _Registrar:
    """The server as the generated `add_*_to_server` functions see it: each method handler they
    register is registered with a deserializer that never raises (`tolerant`)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_TolerantService(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.server.add_registered_method_handlers(service, {name: tolerant(h) for name, h in handlers.items()})


class _TolerantService(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner

    def service(self, details):
        handler = self.inner.service(details)
        return None if handler is None else tolerant(handler)


def tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that gives calls.Undecodable instead of raising (grpcio
    would end the call UNKNOWN with the parser's exception)."""
    parse = handler.request_deserializer
    message_type = getattr(getattr(parse, "__self__", None), "__name__", "request")

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return Undecodable(message_type, e)

    return handler._replace(request_deserializer=deserialize)
