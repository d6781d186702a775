"""The admin HTTP API (tenants, keys, prices, usage, logs), behind an admin key.

    POST   /admin/tenants            {"name", "requests_per_minute"?, "tokens_per_minute"?, "monthly_token_cap"?,
                                      "monthly_spend_cap"?, "log_requests"?, "log_retention_days"?}
    GET    /admin/tenants
    PATCH  /admin/tenants/{tenant}   same limits
    POST   /admin/keys               {"tenant", "expires_in_days"?, "models"?, "requests_per_minute"?, "tokens_per_minute"?}
                                     -> the key, shown this once
    GET    /admin/keys?tenant=T
    DELETE /admin/keys/{key_id}      revoke
    PUT    /admin/prices/{model}     {"input_per_mtok", "cached_input_per_mtok", "output_per_mtok"}
    GET    /admin/usage?tenant=T&since=ISO|epoch&until=...&by=model|key|day&format=csv
    GET    /admin/logs?tenant=T&request_id=R
    POST   /v1/load_lora_adapter     {"lora_name", "lora_path"}   (vLLM's shape; adapters.py)
    POST   /v1/unload_lora_adapter   {"lora_name"}

Every /admin call goes to the Meter actor; the LoRA calls change this ingress's
adapter table. No admin key configured = API disabled.
"""

from __future__ import annotations

import hmac
import json
from datetime import datetime, timezone

from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ziggurat.actors.meter.ledger import to_csv
from ziggurat.actors.ingress import refs
from ziggurat.actors.ingress.protocol import APIError, bad


def parse_time(value: str | None, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise bad(f"'{name}' must be an ISO date/time or a Unix time, got {value!r}", name) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def admin_routes(server) -> list[Route]:
    key = (server.config.admin_key or "").encode()

    def guarded(fn, needs_meter: bool = True):
        async def handler(request):
            if not key or (needs_meter and server.meter is None):
                raise APIError(404, "the admin API is disabled (start serve with --admin-key)", code="not_found")
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, key):
                raise APIError(401, "admin key required", code="invalid_api_key")
            try:
                return await fn(request)
            except ValueError as e:  # TenantError and friends name the field
                raise bad(str(e)) from None
        return handler

    meter = server.meter

    async def body(request) -> dict:
        try:
            b = await request.json()
        except json.JSONDecodeError:
            raise bad("request body is not valid JSON") from None
        if not isinstance(b, dict):
            raise bad("request body must be a JSON object")
        return b

    async def create_tenant(request):
        b = await body(request)
        name = b.pop("name", None)
        return JSONResponse(await refs.result(meter.create_tenant.remote(name, **b)), status_code=201)

    async def list_tenants(request):
        return JSONResponse({"data": await refs.result(meter.list_tenants.remote())})

    async def update_tenant(request):
        return JSONResponse(await refs.result(meter.update_tenant.remote(request.path_params["tenant"], **await body(request))))

    async def create_key(request):
        b = await body(request)
        days = b.pop("expires_in_days", None)
        out = await refs.result(meter.create_key.remote(
            b.pop("tenant", None), expires_in_s=days * 86400 if days else None, models=b.pop("models", None),
            requests_per_minute=b.pop("requests_per_minute", None), tokens_per_minute=b.pop("tokens_per_minute", None)))
        if b:
            raise bad(f"unknown field(s): {', '.join(b)}")
        return JSONResponse(out, status_code=201)

    async def list_keys(request):
        return JSONResponse({"data": await refs.result(meter.list_keys.remote(request.query_params.get("tenant")))})

    async def revoke_key(request):
        ok = await refs.result(meter.revoke_key.remote(request.path_params["key_id"]))
        if not ok:
            raise APIError(404, "no such active key", code="not_found")
        return JSONResponse({"revoked": request.path_params["key_id"]})

    async def set_price(request):
        b = await body(request)
        try:
            args = [float(b[k]) for k in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok")]
        except (KeyError, TypeError, ValueError):
            raise bad("prices need numeric input_per_mtok, cached_input_per_mtok and output_per_mtok") from None
        await refs.result(meter.set_price.remote(request.path_params["model"], *args))
        return JSONResponse({"model": request.path_params["model"], "updated": True})

    async def usage(request):
        q = request.query_params
        rows = await refs.result(meter.usage.remote(q.get("tenant"), parse_time(q.get("since"), "since") or 0.0,
                                               parse_time(q.get("until"), "until"), q.get("by")))
        if q.get("format") == "csv":
            return PlainTextResponse(to_csv(rows), media_type="text/csv")
        return JSONResponse({"data": rows})

    async def logs(request):
        q = request.query_params
        if not q.get("tenant"):
            raise bad("'tenant' is required", "tenant")
        return JSONResponse({"data": await refs.result(meter.logs.remote(q["tenant"], q.get("request_id")))})

    async def load_lora(request):
        b = await body(request)
        lora = server.adapters.load(b.get("lora_name"), b.get("lora_path"))
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")

    async def unload_lora(request):
        b = await body(request)
        server.adapters.unload(b.get("lora_name"))
        return PlainTextResponse(f"Success: LoRA adapter '{b['lora_name']}' removed successfully.")

    return [
        Route("/v1/load_lora_adapter", guarded(load_lora, needs_meter=False), methods=["POST"]),
        Route("/v1/unload_lora_adapter", guarded(unload_lora, needs_meter=False), methods=["POST"]),
        Route("/admin/tenants", guarded(create_tenant), methods=["POST"]),
        Route("/admin/tenants", guarded(list_tenants), methods=["GET"]),
        Route("/admin/tenants/{tenant}", guarded(update_tenant), methods=["PATCH"]),
        Route("/admin/keys", guarded(create_key), methods=["POST"]),
        Route("/admin/keys", guarded(list_keys), methods=["GET"]),
        Route("/admin/keys/{key_id}", guarded(revoke_key), methods=["DELETE"]),
        Route("/admin/prices/{model}", guarded(set_price), methods=["PUT"]),
        Route("/admin/usage", guarded(usage), methods=["GET"]),
        Route("/admin/logs", guarded(logs), methods=["GET"]),
    ]
