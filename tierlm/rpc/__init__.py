"""The gRPC service beside HTTP (`--grpc-port`): KServe's Open Inference Protocol v2
(health, metadata, whole inference) and `tierlm.v1.Generation` (streaming generation).

Both run on the HTTP server's event loop and share its state: the same tiers, tenants
(`authorization` metadata), quotas, routing and engines. The `.proto` files ship in
`tierlm/rpc/proto/`; their Python modules are generated from them (`make proto`).
"""
