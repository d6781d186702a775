"""OpenAIServer: the OpenAI-compatible HTTP API as a starlette app.

Request path (see README):
  1. the Gatekeeper authenticates the key (constant time) and admits the
     request against the tenant's quotas; the body is validated, the chat
     template applied, the prompt tokenized, the request id assigned;
  2. EngineClient: Router.pick once (prefix affinity / least load), then
     Scheduler.submit on that replica;
  3. tokens come back as one TokenBatch per scheduler step, are detokenized
     incrementally, checked for stop strings and streamed as SSE (or
     collected into one JSON response);
  4. a client that goes away aborts its request, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ziggurat.actors.ingress.admin import admin_routes
from ziggurat.actors.scheduler.block_pool import ROOT_HASH, hash_block_tokens
from ziggurat.actors.ingress.engine_client import EngineClient
from ziggurat.actors.ingress.gatekeeper import Gatekeeper, _await
from ziggurat.actors.ingress.protocol import (
    APIError,
    ParsedRequest,
    bad,
    chat_logprobs,
    completion_logprobs,
    now,
    parse_chat,
    parse_completion,
    usage,
)
from ziggurat.actors.worker.actor import load_object
from ziggurat.models.tokenizer import TextStream, Tokenizer

ROUTING_BLOCKS = 8  # prefix blocks whose hashes the router sees
DEFAULT_RESERVATION = 1024  # tokens reserved for quota when a request sets no max_tokens


@dataclass
class IngressConfig:
    model_dir: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    block_size: int = 16
    max_model_len: int = 2048
    request_timeout_s: float = 600.0
    admin_key: str | None = None
    share_prefix_cache: bool = False  # opt-in: one prefix cache across tenants
    redact: str | None = None  # "module:function" applied to request logs before storing


@dataclass
class _Child:
    index: int
    prompt_index: int
    request_id: str
    stream: TextStream
    params: object
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: object = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServer:
    def __init__(self, config: IngressConfig, client: EngineClient, gatekeeper: Gatekeeper, meter=None):
        self.config, self.client, self.gate, self.meter = config, client, gatekeeper, meter
        self.tokenizer = Tokenizer(config.model_dir)
        self.redact = load_object(config.redact) if config.redact else None
        self.metrics = {"requests_total": {}, "prompt_tokens_total": 0, "generation_tokens_total": 0}
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                *admin_routes(self),
            ],
            exception_handlers={APIError: self._api_error, 404: self._not_found, 405: self._not_allowed},
        )
        self.asgi = RequestIdMiddleware(self.app)

    # -- plumbing ---------------------------------------------------------------------

    async def _api_error(self, request, exc: APIError):
        self._count(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def _not_found(self, request, exc):
        return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    async def _not_allowed(self, request, exc):
        return JSONResponse(APIError(405, f"{request.method} not allowed on {request.url.path}").body(), status_code=405)

    def _count(self, status: int) -> None:
        m = self.metrics["requests_total"]
        m[status] = m.get(status, 0) + 1

    async def _body(self, request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        return body

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise APIError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")

    # -- endpoints --------------------------------------------------------------------

    async def models(self, request):
        await self.gate.authenticate(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.served_model_name, "object": "model", "created": now(), "owned_by": "ziggurat",
            "max_model_len": self.config.max_model_len}]})

    async def health(self, request):
        healthy = await _await(self.client.router.healthy.remote())
        if not healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok", "replicas": len(healthy)})

    async def prometheus(self, request):
        stats = await asyncio.gather(*[_await(s.stats.remote()) for s in self.client.schedulers], return_exceptions=True)
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP ziggurat_{name} {help_}")
            lines.append(f"# TYPE ziggurat_{name} {kind}")
            for labels, v in samples:
                lab = ",".join(f'{k}="{val}"' for k, val in labels.items())
                lines.append(f"ziggurat_{name}{{{lab}}} {v}" if lab else f"ziggurat_{name} {v}")

        ok = [s for s in stats if not isinstance(s, BaseException)]
        per = lambda attr: [({"replica": str(s.replica)}, getattr(s, attr)) for s in ok]  # noqa: E731
        metric("num_requests_running", "gauge", "Requests in the running batch.", per("num_running"))
        metric("num_requests_waiting", "gauge", "Requests queued for scheduling.", per("num_waiting"))
        metric("kv_cache_usage", "gauge", "Fraction of KV blocks in use.", per("kv_usage"))
        metric("kv_free_blocks", "gauge", "KV blocks not referenced by any request.", per("num_free_blocks"))
        metric("kv_total_blocks", "gauge", "KV blocks in the cache.", per("num_blocks"))
        metric("num_preemptions_total", "counter", "Requests preempted.", per("num_preemptions"))
        metric("engine_steps_total", "counter", "Scheduler steps run.", per("steps"))
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", per("prompt_tokens"))
        metric("cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.", per("cached_tokens"))
        metric("generation_tokens_total", "counter", "Generated tokens.", per("generation_tokens"))
        metric("replicas_unreachable", "gauge", "Replicas that did not answer this scrape.", [({}, len(stats) - len(ok))])
        metric("http_requests_total", "counter", "HTTP requests by status.",
               [({"status": str(k)}, v) for k, v in sorted(self.metrics["requests_total"].items())])
        metric("inflight_requests", "gauge", "Engine requests this ingress is waiting on.", [({}, len(self.client.queues))])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request):
        principal = await self.gate.authenticate(request.headers.get("authorization"))
        req = parse_completion(await self._body(request))
        self._check_model(req.model)
        prompts = []
        for i, p in enumerate(req.prompts):
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            prompts.append(ids)
        return await self._serve(request, principal, req, prompts, "cmpl")

    async def chat(self, request: Request):
        principal = await self.gate.authenticate(request.headers.get("authorization"))
        req = parse_chat(await self._body(request))
        self._check_model(req.model)
        try:
            ids = self.tokenizer.encode_chat(req.messages, add_generation_prompt=True)
        except Exception as e:  # template errors name the problem
            raise bad(f"chat template failed: {e}", "messages") from None
        return await self._serve(request, principal, req, [ids], "chatcmpl")

    # -- the request path -------------------------------------------------------------------

    async def _serve(self, request: Request, principal, req: ParsedRequest, prompts: list[list[int]], prefix: str):
        request_id = request.scope["ziggurat.request_id"]
        limit = self.config.max_model_len
        param = "messages" if req.kind == "chat" else "prompt"
        for ids in prompts:
            if not ids:
                raise bad("the prompt is empty", param)
            need = len(ids) + (req.params.max_tokens if req.max_tokens_given else 1)
            if need > limit:
                raise bad(
                    f"This model's maximum context length is {limit} tokens. However, you requested {need} tokens "
                    f"({len(ids)} in the {param}, {need - len(ids)} for the completion). Please reduce the length.",
                    param, "context_length_exceeded")
        queue: asyncio.Queue = asyncio.Queue()
        children: list[_Child] = []
        submit = []
        for pi, ids in enumerate(prompts):
            for i in range(req.params.n):
                p = req.params.for_child(i)
                index = pi * req.params.n + i
                rid = f"{request_id}-{index}"
                children.append(_Child(index, pi, rid, TextStream(self.tokenizer, ids, p.stop, p.skip_special_tokens,
                                                                  p.include_stop_str_in_output), p))
                submit.append((rid, ids, p, index))
        # Reserve what the request may generate; without max_tokens, a bounded
        # guess (the real count is settled when it ends).
        room = limit - min(map(len, prompts))
        max_new = req.params.max_tokens if req.params.max_tokens is not None else min(room, DEFAULT_RESERVATION)
        adm = await self.gate.admit(principal, self.config.served_model_name, sum(map(len, prompts)),
                                    max_new * len(children))
        extra = (None, self.gate.cache_salt(principal, req.cache_salt))  # (lora id, cache salt)
        # One routing decision per HTTP request, by the first prompt's prefix.
        hashes, h = [], ROOT_HASH
        bs = self.config.block_size
        for b in range(min(ROUTING_BLOCKS, len(prompts[0]) // bs)):
            h = hash_block_tokens(h, prompts[0][b * bs : (b + 1) * bs], extra)
            hashes.append(h)
        meta = dict(tenant=principal.tenant_id, key_id=principal.key_id, http_request_id=request_id,
                    model=self.config.served_model_name)
        try:
            await self.client.submit(submit, hashes, extra, queue, meta, req.params.n)
        except BaseException:
            self.gate.release(adm, 0)
            raise
        ctx = _RequestContext(principal, adm, req, prompts, request_id)
        self._count(200)
        created = now()
        meta = dict(id=f"{prefix}-{request_id}", created=created, model=self.config.served_model_name)
        ctx.body_meta = meta
        if req.stream:
            return ClosingStream(self._stream(ctx, req, prompts, children, queue, meta),
                                 on_close=lambda: self._finish(ctx, children, "client_disconnected"),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(self._collect(children, queue))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, timeout=self.config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if collect not in done:
                reason = "client_disconnected" if gone in done else "aborted"
                self._finish(ctx, children, reason)
                raise APIError(504 if reason == "aborted" else 499, "the request timed out" if reason == "aborted"
                               else "client closed the connection", "timeout_error")
            collect.result()
        finally:
            collect.cancel()
            gone.cancel()
            self._finish(ctx, children, "aborted")
        self._raise_if_failed(children)
        body = self._full_response(req, prompts, children, meta)
        self._log(ctx, body)
        return JSONResponse(body)

    async def _next(self, children, queue) -> _Child:
        index, u = await queue.get()
        c = children[index]
        c.token_ids.extend(u.new_token_ids)
        for lp in u.new_logprobs:
            c.logprobs.append(lp)
        c.num_output_tokens, c.num_cached_tokens = u.num_output_tokens, u.num_cached_tokens
        delta = c.stream.add(u.new_token_ids, final=u.finish_reason is not None)
        c.text += delta
        if c.stream.stopped and c.finish_reason is None:
            c.finish_reason, c.stop_reason = "stop", c.stream.stop_reason
            if u.finish_reason is None:
                self.client.abort([c.request_id], "stop")
        elif u.finish_reason is not None and c.finish_reason is None:
            c.finish_reason, c.stop_reason = u.finish_reason, u.stop_reason
        c._delta = delta
        c._pending_lps = getattr(c, "_pending_lps", []) + list(u.new_logprobs)
        return c

    @staticmethod
    def _raise_if_failed(children) -> None:
        if any(c.finish_reason == "error" for c in children):
            raise APIError(503, "the replica serving this request failed; retry", "service_unavailable",
                           code="replica_failed", headers={"Retry-After": "1"})

    async def _collect(self, children, queue) -> None:
        while any(c.finish_reason is None for c in children):
            await self._next(children, queue)

    def _finish(self, ctx, children, reason: str) -> None:
        """Abort whatever is unfinished (client gone, timeout), drop routes and
        reconcile the token reservation with what was generated."""
        if ctx.finished:
            return
        ctx.finished = True
        open_ids = [c.request_id for c in children if c.finish_reason is None]
        if open_ids:
            self.client.abort(open_ids, reason)
        self.client.forget([c.request_id for c in children])
        self.gate.release(ctx.admission, sum(map(len, ctx.prompts)) + sum(c.num_output_tokens for c in children))

    def _log(self, ctx, response: dict) -> None:
        """Request/response log, only for tenants that turned it on; best effort,
        apart from metering."""
        if self.meter is None or not self.gate.logs_requests(ctx.principal.tenant_id):
            return
        record = {"request": ctx.req.raw, "response": response}
        if self.redact is not None:
            record = self.redact(record)
        self.meter.log_request.remote(ctx.request_id, ctx.principal.tenant_id, record["request"], record["response"])

    def _lp_entries(self, lps) -> list:
        tok = self.tokenizer
        text = lambda i: tok.decode([i], skip_special_tokens=False)  # noqa: E731
        return [(text(lp.token_id), lp.logprob, [(text(a), b) for a, b in zip(lp.top_ids, lp.top_logprobs)]) for lp in lps]

    def _usage(self, prompts, children) -> dict:
        cached = sum(next(c.num_cached_tokens for c in children if c.prompt_index == i) for i in range(len(prompts)))
        return usage(sum(map(len, prompts)), sum(c.num_output_tokens for c in children), cached)

    def _full_response(self, req, prompts, children, meta) -> dict:
        choices = []
        for c in children:
            lps = self._lp_entries(c.logprobs) if req.logprobs is not None else None
            if req.kind == "chat":
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": chat_logprobs(lps) if lps is not None else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            else:
                choices.append({"index": c.index, "text": c.text,
                                "logprobs": completion_logprobs(lps, 0) if lps is not None else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        obj = "chat.completion" if req.kind == "chat" else "text_completion"
        return dict(meta, object=obj, choices=choices, usage=self._usage(prompts, children))

    async def _stream(self, ctx, req, prompts, children, queue, meta):
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(choices):
            return "data: " + json.dumps(dict(meta, object=obj, choices=choices, **usage_field)) + "\n\n"

        try:
            if chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in children])
            offsets = {c.index: 0 for c in children}
            done = set()
            while len(done) < len(children):
                c = await asyncio.wait_for(self._next(children, queue), self.config.request_timeout_s)
                if c.index in done:
                    continue
                finished = c.finish_reason is not None
                if not c._delta and not finished:
                    continue
                self._raise_if_failed([c])
                lps = self._lp_entries(c._pending_lps) if req.logprobs is not None else None
                c._pending_lps = []  # logprobs ride with the chunk that carries their text
                if chat:
                    choice = {"index": c.index, "delta": {"content": c._delta} if c._delta else {},
                              "logprobs": chat_logprobs(lps) if lps is not None else None}
                else:
                    choice = {"index": c.index, "text": c._delta,
                              "logprobs": completion_logprobs(lps, offsets[c.index]) if lps is not None else None}
                    offsets[c.index] += len(c._delta)
                choice["finish_reason"] = c.finish_reason
                if finished:
                    choice["stop_reason"] = c.stop_reason
                    done.add(c.index)
                yield chunk([choice])
            if req.include_usage:
                yield "data: " + json.dumps(dict(meta, object=obj, choices=[], usage=self._usage(prompts, children))) + "\n\n"
            yield "data: [DONE]\n\n"
            self._log(ctx, {"choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
                                        for c in children], "usage": self._usage(prompts, children)})
        except (asyncio.CancelledError, GeneratorExit):
            self._finish(ctx, children, "client_disconnected")
            raise
        except Exception as e:  # after headers are sent, errors travel in the stream
            err = e if isinstance(e, APIError) else APIError(500, f"internal error: {e}", "internal_error")
            yield "data: " + json.dumps(err.body()) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._finish(ctx, children, "aborted")


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however the response ends.
    The body generator's own `finally` never runs if sending the headers fails
    (the client left first): the generator was never started. on_close must be
    idempotent (the generator's cleanup may already have run)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@dataclass
class _RequestContext:
    principal: object
    admission: object
    req: ParsedRequest
    prompts: list
    request_id: str
    finished: bool = False
    body_meta: dict | None = None


class RequestIdMiddleware:
    """Assigns the server's request id and returns it as X-Request-Id on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        scope["ziggurat.request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
