"""Runtime LoRA adapter loading, as vLLM exposes it: `POST /v1/load_lora_adapter`
{"lora_name", "lora_path"} and `POST /v1/unload_lora_adapter` {"lora_name"}.

Both need `--allow-runtime-lora`, and where a TierSet file declares tenants, an operator's
key (a tenant with `metrics = true`): anyone else gets 403. A loaded adapter is served under its
name over the default tier (or `base_model_name`'s), listed by /v1/models; requests
already running with an unloaded adapter finish with it.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import PlainTextResponse

from tierlm.lora.adapter import LoRAError
from tierlm.server.errors import APIError, bad_request
from tierlm.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from tierlm.server.state import ServerState

ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def _allowed(request: Request, state: ServerState) -> None:
    if not state.allow_runtime_lora:
        raise APIError(403, "loading LoRA adapters at run time is off (start the server with --allow-runtime-lora)",
                       code="runtime_lora_disabled", type="permission_error")
    tenant = request.state.tenant
    if state.declared_tenants and not tenant.config.operator:
        raise APIError(403, "only an operator's API key may load or unload LoRA adapters",
                       code="operator_only", type="permission_error")


def install(app, state: ServerState) -> None:
    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def _load(request: Request, body: LoadLoRAAdapterRequest):
        _allowed(request, state)
        base = body.base_model_name or state.default_tier
        tier = state.tiers.get(base)
        if tier is None:
            raise APIError(404, f"base_model_name '{base}' is not a tier of this server ({', '.join(state.tiers)})",
                           param="base_model_name", code="model_not_found", type="not_found_error")
        if not tier.config.engine.lora.enabled:
            raise bad_request(f"tier '{base}' does not serve LoRA adapters (start it with --enable-lora)",
                              "base_model_name")
        engine = tier.engine.engine
        if engine is None or tier.engine.restarting:
            raise APIError(503, f"tier '{base}' is restarting; try again", code="engine_restarting",
                           type="server_error", headers={"Retry-After": "5"})
        registry = engine.adapters
        name = body.lora_name
        if name in state.tiers or name in state.adapters or name == "auto":
            raise bad_request(f"the name '{name}' is already served", "lora_name")
        try:
            # Reading the files is blocking work: off the event loop.
            adapter = await asyncio.to_thread(registry.add, name, body.lora_path)
        except LoRAError as e:
            raise bad_request(str(e), "lora_path") from None
        state.add_adapter(base, adapter)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def _unload(request: Request, body: UnloadLoRAAdapterRequest):
        _allowed(request, state)
        tier = state.adapters.get(body.lora_name)
        if tier is None:
            raise APIError(404, f"no LoRA adapter named '{body.lora_name}' is loaded", param="lora_name",
                           code="model_not_found", type="not_found_error")
        del state.adapters[body.lora_name]
        registry = state.tiers[tier.parent].engine.engine.adapters
        if registry is not None and registry.get(body.lora_name) is tier.lora:
            registry.remove(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
