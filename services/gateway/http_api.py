"""`HttpApi`: the OpenAI-compatible HTTP front (aiohttp), served in the gateway's event loop beside gRPC.

Routes: POST /v1/chat/completions (SSE streaming or not), POST /v1/completions, GET /v1/models, GET /health.
It shares the servicer's core: the same `Authenticator` (`Authorization: Bearer` -> tenant), `TokenRate`
quota, router placement and `KvStashServicer.events` stream (so metrics and isolation are gRPC's).
Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

Sessions: a request with `session_id` (body) or `x-session-id` (header) continues that session with the
messages it sends (they are appended, as gRPC ResumeSession does), creating it if absent. A request without
one is *transparent*: a chat request whose messages extend a conversation this tenant held before (the
request's messages plus the reply, as `ConversationIndex` remembers it) is served by a fork of that
conversation's session (`GenerateCall.fork_of`: a new session with a copy of its history and KV — from the
device, the host tier or Redis, stored blocks shared by reference) and prefills only the new turns; any
other request starts a new session whose prompt is the whole rendered history (the worker's prefix adoption
may still take stored canonical blocks). `usage.prompt_tokens_details.cached_tokens` reports the tokens whose
KV was reused and `usage.prompt_tokens` the whole prompt. The response names its session (`x-session-id`
header and `session_id` field) so a client may switch to explicit continuation.

Exactness of transparent continuation: a fork continues its parent's gRPC path — its recorded schedule, the
new tokens prefilled in passes cut at `prefix.prefill_chunk` multiples — so the KV and the greedy
continuation are exactly those of the same conversation sent over gRPC turn by turn (tested). The worker
forks only if the session's whole token history (generated tokens included) begins the request's rendering;
where the client's resent text re-tokenizes differently (or the session is busy or gone), the next shorter
remembered conversation is forked — an earlier turn's session, which ends before the difference — so reuse
stops at the last turn boundary before the first differing token (`cached_tokens` shows where); with none
left, a new session (prefix adoption only). The forked session never changes, so an edited later
turn or a regenerated reply forks it again. Per-request sessions are deleted when they leave the tenant's
`http.conversations_per_tenant` most recent conversations, so they do not grow the tenant's session count
without bound. /v1/completions requests are always new sessions (prefix adoption only). Outcomes are counted
in `kvstash_http_conversations_total{result=continued|not_continued|new}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from services.config import KvstashConfig
from services.errors import FailedPrecondition, InvalidArgument, KvstashError, NotFound
from services.gateway.conversations import ConversationIndex
from services.gateway.servicer import KvStashServicer, _session_id
from services.runtime.redis_url import async_redis_client
from services.wire import MAX_STOP_CHARS, MAX_STOPS, DoneEvent, GenerateCall, TokensEvent

MAX_FORK_TRIES = 4  # remembered conversations a transparent request tries, longest first, before a new session
STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "ALREADY_EXISTS": 409, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
          "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
          "INTERNAL": 500}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
         500: "server_error"}
ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after_s: float | None = None) -> web.Response:
    headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return web.json_response({"error": {"message": message, "type": TYPES.get(status, "server_error"),
                                        "param": param, "code": code}}, status=status, headers=headers)


def _kv_error(e: KvstashError) -> web.Response:
    return error_response(STATUS.get(e.code, 500), e.message, code=e.code.lower(), retry_after_s=e.retry_after_s)


class HttpApi:
    def __init__(self, cfg: KvstashConfig, servicer: KvStashServicer):
        self.cfg, self.core = cfg, servicer
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.conversations: ConversationIndex | None = None  # made in start(), on the event loop
        self._tasks: set[asyncio.Task] = set()  # remembering conversations, deleting their old sessions

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.http.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def start(self) -> int:
        self.conversations = ConversationIndex(async_redis_client(self.cfg.redis.url, timeout_s=5.0),
                                               self.cfg.redis.namespace, self.cfg.http.conversations_per_tenant,
                                               self.cfg.redis.kv_ttl_s)
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.gateway.host, self.cfg.http.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self.conversations is not None:
            await self.conversations.client.aclose()

    # ---- plain routes ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        live = len(self.core.router.live())
        return web.json_response({"status": "ok" if live else "unavailable", "workers": live},
                                 status=200 if live else 503)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._tenant(request)
        except KvstashError as e:
            return _kv_error(e)
        m = self.cfg.http.model_name
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "kvstash"}]})

    # ---- generation -----------------------------------------------------------------------------
    def _tenant(self, request: web.Request) -> str:
        return self.core.auth.tenant([(k.lower(), v) for k, v in request.headers.items()])

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _body(self, request: web.Request) -> dict:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _TooLarge(f"request body over http.max_body_bytes={self.cfg.http.max_body_bytes}") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("request body must be a JSON object")
        return body

    def _input(self, body: dict, chat: bool) -> dict:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise _Param("messages must be a non-empty array", "messages")
            out = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    role = m.get("role") if isinstance(m, dict) else None
                    raise _Param(f"messages[{i}].role {str(role)[:32]!r} must be system, user or assistant",
                                 f"messages[{i}].role")
                content = m.get("content")
                if isinstance(content, list):  # content parts: text only
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict)
                                      and p.get("type") == "text")
                if not isinstance(content, str):
                    raise _Param(f"messages[{i}].content must be a string", f"messages[{i}].content")
                out.append({"role": m["role"], "content": content})
            return {"chat": out}
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise _Param("prompt must be a non-empty string", "prompt")
        return {"text": prompt}

    def _call(self, tenant: str, sid: str, create: bool, body: dict, inp: dict) -> GenerateCall:
        limit = self.cfg.session.max_new_tokens_limit
        n = body.get("max_completion_tokens", body.get("max_tokens")) or 0
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
            raise _Param(f"max_tokens={str(n)[:32]} must be an integer in [0, {limit}]", "max_tokens")
        temp, top_p = body.get("temperature", 0.0), body.get("top_p", 1.0)
        for name, v, hi in (("temperature", temp, 2.0), ("top_p", top_p, 1.0)):
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= hi):
                raise _Param(f"{name} must be a number in [0, {hi}]", name)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, list) or len(stop) > MAX_STOPS
                or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stop)):
            raise _Param(f"stop must be up to {MAX_STOPS} strings of 1..{MAX_STOP_CHARS} characters", "stop")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _Param("seed must be an integer", "seed")
        return GenerateCall(tenant=tenant, session_id=sid, create=create, input=inp, max_new_tokens=n,
                            temperature=float(temp or 0.0), top_p=float(1.0 if top_p is None else top_p),
                            seed=seed, stop=list(stop), fresh=create)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            tenant = self._tenant(request)
            body = await self._body(request)
            model = body.get("model")
            if model != self.cfg.http.model_name:
                return error_response(404, f"model {str(model)[:64]!r} does not exist; GET /v1/models lists "
                                      f"{self.cfg.http.model_name!r}", "model", "model_not_found")
            inp = self._input(body, chat)
            explicit = body.get("session_id") or request.headers.get("x-session-id")
            if explicit is not None and not isinstance(explicit, str):
                raise _Param("session_id must be a string", "session_id")
            if explicit:
                call = self._call(tenant, _session_id(explicit), False, body, inp)
                events = await self._open(call, create_missing=True)
            else:
                call = self._call(tenant, uuid.uuid4().hex, True, body, inp)
                events = await self._transparent(call)
        except _Param as e:
            return error_response(400, e.message, e.param, "invalid_value")
        except _TooLarge as e:
            return error_response(413, e.message, None, "request_too_large")
        except KvstashError as e:
            return _kv_error(e)
        stream = bool(body.get("stream"))
        usage_opt = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        done = None
        if chat and not explicit:
            def done(reply: str) -> None:
                self._background(self._remember(tenant, inp["chat"], reply, call.session_id))
        reply = _Reply(chat, self.cfg.http.model_name, call.session_id, done, whole_prompt=not explicit)
        if stream:
            return await reply.stream(request, events, usage_opt)
        return await reply.whole(events)

    async def _transparent(self, call: GenerateCall) -> _Primed:
        """Continue the tenant's conversation that the chat input extends, if any, in a fork of its session
        (the conversation's session stays as it is, for an edit or a regenerate to fork again); else a new
        session. `call.session_id` is the new session either way."""
        if "chat" not in call.input:
            return await self._open(call, create_missing=False)
        counted, found, below = self.core.metrics.http_conversations, False, None
        for _ in range(MAX_FORK_TRIES):  # longest first; then the next shorter remembered conversation
            hit = await self.conversations.find(call.tenant, call.input["chat"], shorter_than=below)
            if hit is None:
                break
            found, (key, parent, cut) = True, hit
            try:
                events = await self._open(dataclasses.replace(call, fork_of=parent, extends=True), create_missing=False)
                counted.labels("continued").inc()
                return events
            except NotFound:  # its session is gone (deleted by id, expired): forget it, look again
                await self.conversations.forget(call.tenant, key)
            except FailedPrecondition as e:  # diverged (a resent reply re-tokenized differently) or busy
                log.info("conversation of %s not forked at %d messages (%s)", call.tenant, cut, e.message)
                below = cut  # an earlier turn's session ends before the difference: fork that one
        counted.labels("not_continued" if found else "new").inc()
        return await self._open(call, create_missing=False)

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remember(self, tenant: str, messages: list[dict], reply: str, sid: str) -> None:
        for gone in await self.conversations.remember(tenant, messages, reply, sid):
            await self._delete(tenant, gone)

    async def _delete(self, tenant: str, sid: str) -> None:
        try:
            await self.core._control("delete", tenant, sid)
            self.core.router.forget(tenant, sid)
        except Exception as e:  # noqa: BLE001 - busy or storage down: it stays (deleted by its owner or TTL)
            log.warning("could not delete superseded HTTP session %s/%s: %s", tenant, sid, e)

    async def _open(self, call: GenerateCall, create_missing: bool):
        """The call's event iterator, primed with its first event (so errors before any token become statuses).
        `create_missing`: a session that does not exist yet is created."""
        method = "HttpGenerate"
        worker = await self.core.router.place(call.tenant, call.session_id, call.input, fork_of=call.fork_of)
        it = self.core.events(method, call, worker)
        try:
            first = await it.__anext__()
        except NotFound:
            if call.create or not create_missing:
                raise
            call.create = True
            worker = await self.core.router.place(call.tenant, call.session_id, call.input)
            it = self.core.events(method, call, worker)
            first = await it.__anext__()
        return _Primed(first, it)


class _Param(InvalidArgument):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _TooLarge(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _Primed:
    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    async def __aiter__(self):
        yield self.first
        async for ev in self.rest:
            yield ev


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class _Reply:
    """Shapes events into OpenAI chat.completion(.chunk) / text_completion objects."""

    def __init__(self, chat: bool, model: str, sid: str, on_done: Callable[[str], None] | None = None,
                 whole_prompt: bool = False):
        """`on_done(text)` runs when the call finished; `whole_prompt`: prompt_tokens counts the session's
        whole prompt (a transparent continuation's history too), not only the tokens this call added."""
        self.chat, self.model, self.sid, self.on_done, self.whole_prompt = chat, model, sid, on_done, whole_prompt
        self.parts: list[str] = []
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _usage(self, d: DoneEvent) -> dict:
        u = d.usage
        prompt = u.session_tokens - u.generated_tokens if self.whole_prompt else u.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": u.generated_tokens,
                "total_tokens": prompt + u.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def _obj(self, choice: dict, chunk: bool, usage: dict | None = None) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "session_id": self.sid,
                "choices": [choice] if choice else [], "usage": usage}

    def _choice(self, text: str, finish: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def _finished(self) -> None:
        if self.on_done is not None:
            self.on_done("".join(self.parts))

    async def whole(self, events: _Primed) -> web.Response:
        try:
            async for ev in events:
                if isinstance(ev, TokensEvent):
                    self.parts.append(ev.text)
                else:
                    self._finished()
                    return web.json_response(
                        self._obj(self._choice("".join(self.parts), _finish(ev.finish_reason), False), False,
                                  self._usage(ev)), headers={"x-session-id": self.sid})
        except KvstashError as e:
            return _kv_error(e)
        return error_response(500, "the generate stream ended without a result")

    async def stream(self, request: web.Request, events: _Primed, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                           "x-session-id": self.sid})
        await resp.prepare(request)

        async def send(obj: dict) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        first = True
        try:
            async for ev in events:
                if isinstance(ev, TokensEvent):
                    self.parts.append(ev.text)
                    await send(self._obj(self._choice(ev.text, None, True, first), True))
                    first = False
                else:
                    self._finished()
                    await send(self._obj(self._choice("", _finish(ev.finish_reason), True, first), True))
                    if include_usage:
                        await send(self._obj({}, True, self._usage(ev)))
        except KvstashError as e:
            await send({"error": {"message": e.message, "type": TYPES.get(STATUS.get(e.code, 500), "server_error"),
                                  "param": None, "code": e.code.lower()}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
