"""OpenAIServer: the OpenAI-compatible HTTP API as a starlette app.

Request path (see README):
  1. the Gatekeeper authenticates the key (constant time) and admits the
     request against the tenant's quotas; the body is validated
     (protocol.py), the chat template applied, the prompt tokenized and
     checked against the replica's limits (actors/scheduler/validation.py);
     the request id comes from RequestIdMiddleware;
  2. the EngineClient picks a replica once, then submits every sample to
     that replica's scheduler;
  3. tokens come back as one TokenBatch per scheduler step; the shared
     output processor (actors/scheduler/output_processor.py) detokenizes
     them incrementally and applies stop strings, and this module writes
     SSE chunks or one JSON response;
  4. a client that goes away aborts its request, freeing its KV blocks.

The app runs over any EngineClient: ray_client.py in a deployment,
local_engine.py (in-process, no Ray) in fast tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ziggurat.actors import metrics
from ziggurat.actors.ingress.adapters import AdapterTable, parse_lora_modules
from ziggurat.actors.ingress.admin import admin_routes
from ziggurat.actors.ingress.engine_client import EngineClient
from ziggurat.actors.ingress.gatekeeper import Gatekeeper
from ziggurat.actors.ingress.delivery_journal import DeliveryJournal
from ziggurat.actors.tracing import Tracing
from ziggurat.actors.ingress.usage_records import UsageRecords
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
from ziggurat.actors.process import load_object
from ziggurat.actors.scheduler.block_pool import prompt_block_hashes
from ziggurat.actors.scheduler.messages import ReplicaInfo
from ziggurat.actors.scheduler.request import cache_extra_keys
from ziggurat.actors.scheduler.output_processor import Delta, RequestOutputs
from ziggurat.actors.scheduler.validation import ModelLimits, RequestError, check_request
from ziggurat.actors.ingress.tool_calls import ToolStream, call_json, parser_for
from ziggurat.models.config import ModelConfig, sampling_defaults
from ziggurat.models.tokenizer import Tokenizer

log = logging.getLogger("ziggurat.ingress")

# Prefix blocks whose hashes the router sees (its index matches leading blocks;
# 128 blocks of 16 tokens: a 2,048-token prefix, ~0.4 ms of hashing on a slow core).
ROUTING_BLOCKS = 128
DEFAULT_RESERVATION = 1024  # tokens reserved for quota when a request sets no max_tokens
access_log = logging.getLogger("ziggurat.access")  # one line per request at INFO (no prompt text)
MAX_ATTEMPTS = 3  # a request that streamed nothing is retried on another replica this many times in all


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class IngressConfig:
    """The HTTP front door's settings (the CLI makes a flag of each that has help and no cli=False)."""

    served_model_name: str | None = _opt(None, "the model name clients ask for (default: the model directory's)")
    lora_modules: str | None = _opt(None, "LoRA adapters served as models: name=path[,name=path ...] (needs "
                                          "--enable-lora; also addressed as <served name>:<name>)")
    tool_call_parser: str | None = _opt(None, "how tool calls are found in the text: hermes, llama3_json or mistral "
                                              "(default: recognised from the chat template)")
    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8000, "port to listen on (0: any free port)")
    # Secrets: given by environment or file in the CLI (cluster/cli.py), never echoed.
    api_keys: tuple[str, ...] = _opt((), "static API keys (the 'default' tenant)", cli=False)
    admin_key: str | None = _opt(None, "enables the /admin API", cli=False)
    request_timeout_s: float = _opt(600.0, "seconds a request may take before it is aborted")
    read_timeout_s: float = _opt(15.0, "seconds a client may take to send a request head or body")
    max_body_bytes: int = _opt(8 << 20, "largest request body accepted (bytes); larger is a 413")
    tokenizer_threads: int = _opt(4, "threads that tokenize and apply chat templates (off the event loop)")
    share_prefix_cache: bool = _opt(False, "share cached prompt prefixes across tenants (a public system prompt); "
                                           "tenants can then observe each other's cache hits by timing")
    redact: str | None = _opt(None, "module:function applied to request logs before they are stored "
                                    "(e.g. ziggurat.actors.meter.tenancy:redact_pii)")

    def __post_init__(self) -> None:
        from ziggurat.actors.ingress.tool_calls import PARSERS

        parse_lora_modules(self.lora_modules)  # the format (the adapters are read when the server starts)
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser: unknown parser {self.tool_call_parser!r}; "
                             f"known: {', '.join(PARSERS)}")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServer:
    def __init__(self, config: IngressConfig, client: EngineClient, gatekeeper: Gatekeeper, replica: ReplicaInfo,
                 meter=None, journal: DeliveryJournal | None = None, tracing: Tracing | None = None):
        """replica: the limits every replica can hold (the smallest max_model_len of the deployment)."""
        self.config, self.client, self.gate, self.meter = config, client, gatekeeper, meter
        self.tracing = tracing or Tracing(None)
        client.tracing = self.tracing
        self.replica = replica
        self.limits = ModelLimits(replica.max_model_len, replica.vocab_size, replica.max_lora_rank)
        # LoRA adapters addressed as models (adapters.py); load/unload through admin.py.
        self.adapters = AdapterTable(config.served_model_name, replica.max_lora_rank,
                                     parse_lora_modules(config.lora_modules),
                                     ModelConfig.from_dir(replica.model) if replica.max_lora_rank else None)
        self.tokenizer = Tokenizer(replica.model)
        if not self.tokenizer.chat_template:
            log.warning("model %s has no chat template (chat_template.jinja, chat_template.json or "
                        "tokenizer_config.json): /v1/chat/completions will answer 400; /v1/completions works",
                        replica.model)
        self.sampling_defaults = sampling_defaults(replica.model)
        self._grammars = None  # GrammarCompiler for checking constraints, made on first use
        self._tool_parser = None  # the model family's tool-call parser (tool_calls.py), chosen on first use
        self._started = now()
        if self.sampling_defaults:
            log.info("the model's generation_config.json sets request defaults: %s", self.sampling_defaults)
        self.pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")
        self.records = UsageRecords(meter)  # failures on our side, metered here (usage_records.py)
        self.journal = journal  # what open streams' clients received, for a successor (delivery_journal.py)
        self._tasks: list[asyncio.Task] = []
        # No text longer than this (UTF-8 bytes) can fit the context: every token covers at most
        # max_token_bytes of it. Checked before tokenizing, so a huge prompt costs nothing.
        self.max_prompt_bytes = self.limits.max_model_len * self.tokenizer.max_token_bytes + 4096
        self.redact = load_object(config.redact) if config.redact else None
        self.http_requests: dict[int, int] = {}  # status -> count
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/chat/completions/render", self.render_chat, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"]),
                Route("/version", self.version, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/docs", self.docs, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                *admin_routes(self),
            ],
            exception_handlers={APIError: self._api_error, 404: self._not_found, 405: self._not_allowed,
                                Exception: self._internal_error},
        )
        self.asgi = RequestIdMiddleware(self.app)

    async def start(self) -> None:
        """Background work on the serving event loop: usage records out, the token-batch gap watchdog."""
        self.client.bind(asyncio.get_running_loop())
        await self.gate.start()
        self._tasks.append(asyncio.ensure_future(self.records.run()))
        self._tasks.append(asyncio.ensure_future(self._watch_gaps()))

    async def _watch_gaps(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.client.check_gaps()

    # -- plumbing ---------------------------------------------------------------------

    async def _api_error(self, request, exc: APIError):
        self._count(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def _internal_error(self, request, exc):
        """Anything unhandled: an OpenAI-shaped 500 (the connection stays usable; RequestIdMiddleware
        swallows the re-raise starlette makes for logging, after logging it once)."""
        self._count(500)
        return JSONResponse(APIError(500, f"internal error ({type(exc).__name__})", "internal_error",
                                     code="internal").body(), status_code=500)

    async def _not_found(self, request, exc):
        return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    async def _not_allowed(self, request, exc):
        return JSONResponse(APIError(405, f"{request.method} not allowed on {request.url.path}").body(), status_code=405)

    def _count(self, status: int) -> None:
        self.http_requests[status] = self.http_requests.get(status, 0) + 1

    async def _body(self, request: Request) -> dict:
        """The JSON body, read within the read timeout and the size limit; parsed off
        the event loop when large; nesting too deep for the parser is a 400."""
        limit = self.config.max_body_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of {limit}", code="body_too_large")

        async def read() -> bytes:
            chunks, n = [], 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), self.config.read_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.config.read_timeout_s:g} s",
                           code="read_timeout") from None
        try:
            body = json.loads(raw) if len(raw) < 1 << 16 else await self._off_loop(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("request body is not valid JSON") from None
        except RecursionError:
            raise bad("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        return body

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _text_bytes(self, text: str, param: str) -> int:
        """A prompt text's UTF-8 size (a lone surrogate is a 400), refused before
        tokenizing if it cannot possibly fit the context."""
        try:
            n = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise bad(f"'{param}' is not valid Unicode text (a lone surrogate)", param) from None
        if n > self.max_prompt_bytes:
            raise bad(f"{param}: {n} bytes of text cannot fit max_model_len={self.limits.max_model_len} tokens",
                      param, "context_length_exceeded")
        return n

    def _check_model(self, name: str | None):
        """The LoRARequest a request's `model` names (None: the base model), or a 404 naming `model`."""
        return self.adapters.resolve(name)

    # -- endpoints --------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.config.served_model_name, "object": "model", "created": self._started, "owned_by": "ziggurat",
                "max_model_len": self.limits.max_model_len, "root": str(self.replica.model)}

    async def models(self, request):
        await self.gate.authenticate(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [self._model_card(),
                                                        *self.adapters.cards(self.limits.max_model_len)]})

    async def model(self, request):
        """GET /v1/models/{id} (the SDK's models.retrieve)."""
        await self.gate.authenticate(request.headers.get("authorization"))
        name = request.path_params["model"]
        lora = self._check_model(name)
        if lora is None:
            return JSONResponse(self._model_card())
        card = next(c for c in self.adapters.cards(self.limits.max_model_len) if c["id"] == lora.lora_name)
        return JSONResponse({**card, "id": name})

    async def _conversation_ids(self, body: dict) -> tuple[list[int], str]:
        """A chat body's prompt: (token ids, rendered text), as /v1/chat/completions builds it."""
        req = parse_chat(body, self.sampling_defaults)
        self._check_model(req.model)
        kw = {"tools": req.tools.tools} if req.tools is not None else {}
        gen = body.get("add_generation_prompt", True)
        try:
            text = await self._off_loop(lambda: self.tokenizer.apply_chat_template(req.messages, gen, **kw))
        except Exception as e:
            raise bad(f"chat template failed: {e}", "messages") from None
        return await self._off_loop(lambda: self.tokenizer.encode(text, add_special_tokens=False)), text

    async def render_chat(self, request):
        """POST /v1/chat/completions/render: the prompt a chat request becomes, without generating."""
        await self.gate.authenticate(request.headers.get("authorization"))
        ids, text = await self._conversation_ids(await self._body(request))
        return JSONResponse({"model": self.config.served_model_name, "prompt": text, "prompt_token_ids": ids,
                             "count": len(ids), "max_model_len": self.limits.max_model_len})

    async def tokenize(self, request):
        """POST /tokenize (vLLM's shape): {prompt} or {messages}; returns count, max_model_len, tokens."""
        await self.gate.authenticate(request.headers.get("authorization"))
        body = await self._body(request)
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        if "messages" in body:
            ids, _ = await self._conversation_ids(body)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("'prompt' (a string) or 'messages' is required", "prompt")
            self._check_model(body.get("model"))
            self._text_bytes(prompt, "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise bad("'add_special_tokens' must be a boolean", "add_special_tokens")
            ids = await self._off_loop(lambda: self.tokenizer.encode(prompt, add_special_tokens=special))
        out = {"count": len(ids), "max_model_len": self.limits.max_model_len, "tokens": ids}
        if body.get("return_token_strs"):
            out["token_strs"] = [self.tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(out)

    async def detokenize(self, request):
        """POST /detokenize (vLLM's shape): {tokens} -> {prompt}."""
        await self.gate.authenticate(request.headers.get("authorization"))
        body = await self._body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("'tokens' must be an array of token ids", "tokens")
        self._check_model(body.get("model"))
        bad_ids = [t for t in tokens if not 0 <= t < self.limits.vocab_size]
        if bad_ids:
            raise bad(f"'tokens': ids outside the vocabulary (0..{self.limits.vocab_size - 1}): {bad_ids[:5]}",
                      "tokens")
        text = await self._off_loop(lambda: self.tokenizer.decode(tokens, skip_special_tokens=False))
        return JSONResponse({"prompt": text})

    async def version(self, request):
        from ziggurat import __version__

        return JSONResponse({"version": __version__})

    async def openapi(self, request):
        from ziggurat import __version__
        from ziggurat.actors.ingress.openapi import document

        return JSONResponse(document("ziggurat", __version__, self.config.served_model_name or ""))

    async def docs(self, request):
        from ziggurat import __version__
        from ziggurat.actors.ingress.openapi import docs_page, document

        return HTMLResponse(docs_page(document("ziggurat", __version__, self.config.served_model_name or "")))

    async def health(self, request):
        healthy = await self.client.healthy()
        if not healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok", "replicas": len(healthy)})

    async def prometheus(self, request):
        stats = await self.client.replica_stats()
        ok = [s for s in stats if not isinstance(s, BaseException)]
        samples = metrics.replica_samples(ok, self.config.served_model_name or "")
        samples += [(metrics.UNREACHABLE, {}, len(stats) - len(ok)),
                    (metrics.INFLIGHT, {}, len(self.client.queues)),
                    (metrics.COLD_START, {}, self.client.cold_waiting),
                    (metrics.USAGE_RECORDS, {}, len(self.records.pending))]
        delivery = self.client.delivery.series.get("")
        if delivery is not None:
            samples.append((metrics.TOKEN_DELIVERY, {}, delivery))
        samples += [(metrics.ROUTES, {"kind": k}, v) for k, v in sorted(self.client.routes.items())]
        samples += [(metrics.HTTP_REQUESTS, {"status": str(k)}, v) for k, v in sorted(self.http_requests.items())]
        return PlainTextResponse(metrics.render_prometheus(samples), media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request):
        principal = await self.gate.authenticate(request.headers.get("authorization"))
        req = parse_completion(await self._body(request), self.sampling_defaults)
        self._use_adapter(req)
        await self._check_grammar(req)
        texts = [p for p in req.prompts if isinstance(p, str)]
        for p in texts:
            self._text_bytes(p, "prompt")
        encoded = iter(await self._off_loop(lambda: [self.tokenizer.encode(p) for p in texts]) if texts else [])
        prompts = [next(encoded) if isinstance(p, str) else list(p) for p in req.prompts]
        return await self._serve(request, principal, req, prompts, "cmpl")

    async def chat(self, request: Request):
        principal = await self.gate.authenticate(request.headers.get("authorization"))
        req = parse_chat(await self._body(request), self.sampling_defaults)
        self._use_adapter(req)
        await self._check_grammar(req)
        total = sum(self._text_bytes(m["content"], "messages") for m in req.messages)
        if total > self.max_prompt_bytes:
            raise bad(f"messages: {total} bytes of text cannot fit max_model_len={self.limits.max_model_len} tokens",
                      "messages", "context_length_exceeded")
        kw = {"tools": req.tools.tools} if req.tools is not None else {}
        try:
            ids = await self._off_loop(lambda: self.tokenizer.encode_chat(req.messages, add_generation_prompt=True,
                                                                          **kw))
        except Exception as e:  # template errors name the problem
            raise bad(f"chat template failed: {e}", "messages") from None
        return await self._serve(request, principal, req, [ids], "chatcmpl")

    def _use_adapter(self, req: ParsedRequest) -> None:
        """The adapter the request's `model` names goes with its sampling parameters."""
        lora = self._check_model(req.model)
        if lora is not None:
            req.params = req.params.clone(lora_request=lora)

    def _tool_stream(self, req) -> ToolStream:
        if self._tool_parser is None:
            self._tool_parser = parser_for(self.tokenizer.template_for(tools=True), self.config.tool_call_parser)
        return ToolStream(req.tools, self._tool_parser)

    async def _check_grammar(self, req) -> None:
        """A structured-output constraint is compiled here first (cached), so a bad schema,
        regex or grammar is a 400 naming the field the client used."""
        if req.grammar is None:
            return
        from ziggurat.actors.scheduler.structured import GrammarCompiler, StructuredOutputError

        def compile_it():
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.replica.vocab_size)
            self._grammars.compile(req.grammar)

        try:
            await self._off_loop(compile_it)
        except StructuredOutputError as e:
            raise bad(str(e), e.field) from None

    # -- the request path -------------------------------------------------------------------

    async def _serve(self, request: Request, principal, req: ParsedRequest, prompts: list[list[int]], prefix: str):
        request_id = request.scope["ziggurat.request_id"]
        param = "messages" if req.kind == "chat" else "prompt"
        for ids in prompts:
            try:
                check_request(ids, req.params, self.limits, param)
            except RequestError as e:
                raise bad(e.message, e.param, e.code if e.code == "context_length_exceeded" else None) from None
        # Reserve what the request may generate (never more than the context
        # leaves); without max_tokens, a bounded guess (settled when it ends).
        room = self.limits.max_model_len - min(map(len, prompts))
        max_new = min(room, req.params.max_tokens if req.params.max_tokens is not None else DEFAULT_RESERVATION)
        n_samples = len(prompts) * req.params.n
        adm = await self.gate.admit(principal, self.config.served_model_name, sum(map(len, prompts)),
                                    max_new * n_samples, bounded=req.params.max_tokens is not None)
        lora = req.params.lora_request
        extra = cache_extra_keys(lora, self.gate.cache_salt(principal, req.cache_salt))  # (lora id, cache salt)
        # One routing decision per HTTP request, by the first prompt's prefix.
        hashes = prompt_block_hashes(prompts[0], self.replica.block_size, extra, ROUTING_BLOCKS)
        meta = dict(tenant=principal.tenant_id, key_id=principal.key_id, http_request_id=request_id,
                    model=self.config.served_model_name, lora=lora.lora_name if lora is not None else None)
        span = None
        if self.tracing.enabled:
            p = req.params
            span = self.tracing.start(f"ingress {request.method} {request.url.path}", self.tracing.extract(
                request.headers), {"gen_ai.operation.name": "chat" if req.kind == "chat" else "text_completion",
                                   "gen_ai.request.model": self.config.served_model_name,
                                   "gen_ai.request.max_tokens": p.max_tokens, "gen_ai.request.temperature":
                                   p.temperature, "gen_ai.request.choice.count": p.n, "ziggurat.request_id":
                                   request_id, "ziggurat.tenant": principal.tenant_id}, server=True)
            meta["trace"] = self.tracing.carrier(span)
        ctx = _RequestContext(principal, adm, req, None, None, request_id, prompts=prompts, submit=(hashes, extra, meta,
                                                                                                 param), span=span)
        try:
            await self._attempt(ctx)
        except BaseException:
            self.gate.release(adm, 0)
            raise
        self._count(200)
        body_meta = dict(id=f"{prefix}-{request_id}", created=now(),
                         model=req.model if lora is not None else self.config.served_model_name)
        if req.stream:
            return ClosingStream(self._stream(ctx, body_meta),
                                 on_close=lambda: self._finish(ctx, "client_disconnected"),
                                 after_send=(lambda: self._journal_sent(ctx)) if self.journal is not None else None,
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                collect = asyncio.ensure_future(self._collect(ctx))
                try:
                    done, _ = await asyncio.wait({collect, gone}, timeout=self.config.request_timeout_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    collect.cancel()
                if collect not in done:
                    reason = "client_disconnected" if gone in done else "aborted"
                    self._finish(ctx, reason)
                    raise APIError(504 if reason == "aborted" else 499, "the request timed out"
                                   if reason == "aborted" else "client closed the connection", "timeout_error")
                collect.result()
                if not (ctx.outputs.failed and await self._retry(ctx)):
                    break
        finally:
            gone.cancel()
            self._finish(ctx, "aborted")
        self._raise_if_failed(ctx.outputs.samples)
        for s in ctx.outputs.samples:
            s.delivered = s.num_output_tokens
        body = self._full_response(req, ctx.outputs, body_meta)
        self._log(ctx, body)
        return JSONResponse(body)

    async def _attempt(self, ctx) -> None:
        """Submit the request (all its samples) as attempt number ctx.attempts."""
        hashes, extra, meta, param = ctx.submit
        rid = ctx.request_id if ctx.attempts == 0 else f"{ctx.request_id}.r{ctx.attempts}"
        ctx.outputs = RequestOutputs(rid, ctx.prompts, ctx.req.params, self.tokenizer)
        ctx.queue = asyncio.Queue()
        ctx.attempts += 1
        ctx.recorded_failure = False
        ctx.replica = await self.client.submit(ctx.outputs, hashes, extra, ctx.queue, meta, param)

    async def _retry(self, ctx) -> bool:
        """After a failure on our side: record what the failed attempt's client got
        and, if it got nothing yet and attempts are left, submit again (another
        replica: the failed one left routing). False: the failure stands."""
        self.records.failed(ctx.outputs, ctx.submit[2], ctx.replica, ctx.arrived)
        ctx.recorded_failure = True
        self.client.abort(ctx.outputs.unfinished_ids(), "error")
        self.client.forget([s.request_id for s in ctx.outputs.samples])
        if ctx.sent_text or ctx.attempts >= MAX_ATTEMPTS:
            return False
        try:
            await self._attempt(ctx)
        except APIError:
            return False
        return True

    async def _next(self, ctx) -> Delta | None:
        """The next update of any of the request's samples, applied (None: nothing new for that sample)."""
        index, u = await ctx.queue.get()
        if ctx.first_token_at is None and u.new_token_ids:
            ctx.first_token_at = time.time()
        delta = ctx.outputs.apply(index, u)
        if delta is not None and delta.stop_now:
            self.client.abort([delta.sample.request_id], "stop")
        return delta

    @staticmethod
    def _raise_if_failed(samples) -> None:
        if any(s.finish_reason == "error" for s in samples):
            raise APIError(503, "the replica serving this request failed; retry", "service_unavailable",
                           code="replica_failed", headers={"Retry-After": "1"})

    async def _collect(self, ctx) -> None:
        while not ctx.outputs.finished:
            await self._next(ctx)

    def _finish(self, ctx, reason: str) -> None:
        """Abort whatever is unfinished (client gone, timeout), drop routes and
        reconcile the token reservation with what was generated."""
        if ctx.finished:
            return
        ctx.finished = True
        if ctx.outputs.failed and not ctx.recorded_failure:
            self.records.failed(ctx.outputs, ctx.submit[2], ctx.replica, ctx.arrived)
        open_ids = ctx.outputs.unfinished_ids()
        if open_ids:
            self.client.abort(open_ids, reason)
        self.client.forget([s.request_id for s in ctx.outputs.samples])
        self.gate.release(ctx.admission, ctx.outputs.prompt_tokens + ctx.outputs.completion_tokens)
        if access_log.isEnabledFor(logging.INFO):
            o, now = ctx.outputs, time.time()
            ttft = f"{(ctx.first_token_at - ctx.arrived) * 1e3:.0f}" if ctx.first_token_at else "-"
            access_log.info("%s tenant=%s model=%s status=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s "
                            "duration_ms=%.0f", ctx.request_id, ctx.principal.tenant_id, self.config.served_model_name,
                            ",".join(sorted({str(s.finish_reason or reason) for s in o.samples})), o.prompt_tokens,
                            o.completion_tokens, ttft, (now - ctx.arrived) * 1e3)
        if ctx.span is not None:
            o = ctx.outputs
            self.tracing.end(ctx.span, {"gen_ai.usage.input_tokens": o.prompt_tokens,
                                        "gen_ai.usage.output_tokens": o.completion_tokens,
                                        "gen_ai.response.finish_reasons": [str(s.finish_reason) for s in o.samples],
                                        "ziggurat.attempts": ctx.attempts, "ziggurat.end": reason})

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

        def entry(i: int) -> tuple[str, bytes]:
            return tok.decode([i], skip_special_tokens=False), tok.token_bytes(i)

        return [(*entry(lp.token_id), lp.logprob, [(*entry(a), b) for a, b in zip(lp.top_ids, lp.top_logprobs)])
                for lp in lps]

    @staticmethod
    def _usage(outputs: RequestOutputs) -> dict:
        return usage(outputs.prompt_tokens, outputs.completion_tokens, outputs.cached_tokens)

    def _full_response(self, req, outputs: RequestOutputs, meta) -> dict:
        choices = []
        for s in outputs.samples:
            lps = self._lp_entries(s.logprobs) if req.logprobs is not None else None
            if req.kind == "chat":
                message, finish = {"role": "assistant", "content": s.text}, s.finish_reason
                if req.tools is not None:
                    ts = self._tool_stream(req)
                    content = ts.add(s.text)
                    rest, calls = ts.finish()
                    content += rest
                    if calls:
                        message = {"role": "assistant", "content": content or None, "tool_calls": call_json(calls)}
                        finish = "tool_calls"
                choices.append({"index": s.index, "message": message,
                                "logprobs": chat_logprobs(lps) if lps is not None else None,
                                "finish_reason": finish, "stop_reason": s.stop_reason})
            else:
                choices.append({"index": s.index, "text": s.text,
                                "logprobs": completion_logprobs(lps, 0) if lps is not None else None,
                                "finish_reason": s.finish_reason, "stop_reason": s.stop_reason})
                if req.return_token_ids:
                    choices[-1].update(prompt_token_ids=list(outputs.prompts[s.prompt_index]),
                                       token_ids=list(s.token_ids))
        obj = "chat.completion" if req.kind == "chat" else "text_completion"
        return dict(meta, object=obj, choices=choices, usage=self._usage(outputs))

    async def _stream(self, ctx, meta):
        req, outputs = ctx.req, ctx.outputs
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(choices):
            return "data: " + json.dumps(dict(meta, object=obj, choices=choices, **usage_field)) + "\n\n"

        self._journal_open(ctx)
        try:
            if chat:
                yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for s in outputs.samples])
            offsets = [0] * len(outputs.samples)  # text offsets, for completions' logprobs
            tools = [self._tool_stream(req) for _ in outputs.samples] if chat and req.tools is not None else None
            pending_lps: list[list] = [[] for _ in outputs.samples]  # logprobs ride with the chunk carrying their text
            sent_ids = [None] * len(outputs.samples)  # return_token_ids: token ids sent per choice (None: no chunk yet)
            while not outputs.finished:
                d = await asyncio.wait_for(self._next(ctx), self.config.request_timeout_s)
                if d is None:
                    continue
                s = d.sample
                if s.finish_reason == "error":
                    self._journal_close(ctx, outputs)
                    if await self._retry(ctx):  # nothing reached the client yet: start over elsewhere
                        outputs = ctx.outputs
                        self._journal_open(ctx)
                        pending_lps = [[] for _ in outputs.samples]
                        sent_ids = [None] * len(outputs.samples)
                        continue
                    self._raise_if_failed([s])
                pending_lps[s.index] += d.logprobs
                if not d.text and not d.finished:
                    continue
                lps = self._lp_entries(pending_lps[s.index]) if req.logprobs is not None else None
                pending_lps[s.index] = []
                if chat:
                    text, calls = d.text, []
                    if tools is not None:
                        text = tools[s.index].add(d.text)
                        if d.finished:
                            rest, calls = tools[s.index].finish()
                            text += rest
                    delta = {"content": text} if text else {}
                    if calls:
                        delta["tool_calls"] = call_json(calls, with_index=True)
                    choice = {"index": s.index, "delta": delta,
                              "logprobs": chat_logprobs(lps) if lps is not None else None}
                else:
                    choice = {"index": s.index, "text": d.text,
                              "logprobs": completion_logprobs(lps, offsets[s.index]) if lps is not None else None}
                    offsets[s.index] += len(d.text)
                    if req.return_token_ids:  # the tokens since this choice's last chunk; the prompt on its first
                        if sent_ids[s.index] is None:
                            choice["prompt_token_ids"] = list(outputs.prompts[s.prompt_index])
                        choice["token_ids"] = s.token_ids[sent_ids[s.index] or 0:]
                        sent_ids[s.index] = len(s.token_ids)
                choice["finish_reason"] = "tool_calls" if chat and tools is not None and calls else s.finish_reason
                if d.finished:
                    choice["stop_reason"] = s.stop_reason
                ctx.sent_text = ctx.sent_text or bool(d.text)
                s.delivered = s.num_output_tokens
                ctx.in_send = (s.request_id, s.delivered)  # journaled once its send returns (_journal_sent)
                yield chunk([choice])
            if req.include_usage:
                yield "data: " + json.dumps(dict(meta, object=obj, choices=[], usage=self._usage(outputs))) + "\n\n"
            yield "data: [DONE]\n\n"
            self._log(ctx, {"choices": [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason}
                                        for s in outputs.samples], "usage": self._usage(outputs)})
        except (asyncio.CancelledError, GeneratorExit):
            self._finish(ctx, "client_disconnected")
            raise
        except Exception as e:  # after headers are sent, errors travel in the stream
            err = e if isinstance(e, APIError) else APIError(500, f"internal error: {e}", "internal_error")
            yield "data: " + json.dumps(err.body()) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._journal_close(ctx, ctx.outputs)
            self._finish(ctx, "aborted")

    def _journal_sent(self, ctx) -> None:
        if ctx.in_send is not None:
            self.journal.sent(*ctx.in_send)
            ctx.in_send = None

    def _journal_open(self, ctx) -> None:
        if self.journal is None:
            return
        hashes, extra, meta, param = ctx.submit
        n = ctx.req.params.n
        for s in ctx.outputs.samples:
            self.journal.opened(s.request_id, dict(meta, prompt_tokens=len(ctx.prompts[s.prompt_index]),
                                                   bill_prompt=s.index % n == 0, replica=ctx.replica,
                                                   arrived=ctx.arrived))

    def _journal_close(self, ctx, outputs) -> None:
        if self.journal is not None and outputs is not None:
            for s in outputs.samples:
                self.journal.closed(s.request_id)


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however the response ends.
    The body generator's own `finally` never runs if sending the headers fails
    (the client left first): the generator was never started. on_close must be
    idempotent (the generator's cleanup may already have run)."""

    def __init__(self, content, on_close, after_send=None, **kwargs):
        """after_send(): called as soon as each body chunk's send has returned (its
        bytes are the kernel's): the delivery journal's moment, as close to the
        socket write as the app can be."""
        super().__init__(content, **kwargs)
        self._on_close, self._after_send = on_close, after_send

    async def __call__(self, scope, receive, send) -> None:
        after = self._after_send
        if after is not None:
            inner = send

            async def send(message):
                await inner(message)
                if message["type"] == "http.response.body":
                    after()

        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@dataclass
class _RequestContext:
    principal: object
    admission: object
    req: ParsedRequest
    outputs: RequestOutputs | None  # the current attempt's
    queue: asyncio.Queue | None
    request_id: str
    prompts: list = field(default_factory=list)
    submit: tuple = ()  # (prefix hashes, cache extra keys, metering meta, prompt param)
    attempts: int = 0
    replica: int | None = None
    sent_text: bool = False  # some text reached the client (a failure can no longer be retried)
    recorded_failure: bool = False
    in_send: tuple | None = None  # (engine request id, tokens delivered) of the chunk being sent
    arrived: float = field(default_factory=time.time)
    finished: bool = False
    span: object = None  # the ingress span (tracing on)
    first_token_at: float | None = None  # wall clock (the access log's TTFT)


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


def _client_request_id(scope) -> str | None:
    """The client's X-Request-Id, reduced to [A-Za-z0-9._:-] and 64 characters; None if absent or empty."""
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id":
            clean = "".join(c for c in v.decode("latin-1") if c in _ID_CHARS)[:64]
            return clean or None
    return None


class RequestIdMiddleware:
    """Assigns the server's request id and returns it as X-Request-Id on every
    response. Outermost: an exception that escapes the app after its response
    was sent (starlette re-raises what it answered with a 500) is logged here
    and goes no further, so the connection and the actor carry on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client_id = _client_request_id(scope)
        # A gateway's id is kept as the prefix of ours (so the ledger and logs link to it)
        # and echoed as it was sent; ours stays unique when a client reuses its ids.
        rid = f"{client_id}-{uuid.uuid4().hex[:12]}" if client_id else uuid.uuid4().hex
        scope["ziggurat.request_id"] = rid
        echo = [(b"x-request-id", (client_id or rid).encode())]
        if client_id:
            echo.append((b"x-ziggurat-request-id", rid.encode()))
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + echo
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", rid)
            if not started:
                body = json.dumps(APIError(500, "internal error", "internal_error", code="internal").body()).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"), *echo]})
                await send({"type": "http.response.body", "body": body})
