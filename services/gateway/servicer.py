"""`KvStashServicer`: the kvstash.v1 API over the router and the worker actors.

Every handler authenticates first (tenant from credentials, never from the request), validates its
request (INVALID_ARGUMENT naming the field and limit), then routes. Errors are raised as
`KvstashError`s; `ErrorInterceptor` turns them into statuses.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import ray

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.api.kvstash.v1 import kvstash_pb2_grpc as pb_grpc
from services.config import KvstashConfig
from services.errors import Internal, InvalidArgument, NotFound, Unavailable
from services.gateway.auth import Authenticator
from services.gateway.quota import TokenRate
from services.gateway.router import Router, WorkerHandle
from services.metrics import GatewayMetrics
from services.wire import (
    ID_RE,
    MAX_STOP_CHARS,
    MAX_STOPS,
    DoneEvent,
    ErrorEvent,
    GenerateCall,
    KvSource,
    SessionInfo,
    Tier,
    TokensEvent,
    Usage,
)

# the wire's names -> the proto's enums (every member mapped: tests/services/test_wire.py)
SOURCES = {KvSource.NEW: pb.KV_SOURCE_NEW, KvSource.DEVICE: pb.KV_SOURCE_DEVICE,
           KvSource.RESTORED: pb.KV_SOURCE_RESTORED, KvSource.RECOMPUTED: pb.KV_SOURCE_RECOMPUTED,
           KvSource.PREFIX: pb.KV_SOURCE_PREFIX}
TIERS = {Tier.NONE: pb.TIER_UNSPECIFIED, Tier.DEVICE: pb.TIER_DEVICE, Tier.HOST: pb.TIER_HOST,
         Tier.REDIS: pb.TIER_REDIS}
_STATES = {"active": pb.SESSION_STATE_ACTIVE, "cold": pb.SESSION_STATE_COLD}


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, generated_tokens=u.generated_tokens,
                    kv_source=SOURCES[KvSource(u.kv_source)], session_tokens=u.session_tokens,
                    cached_tier=TIERS[Tier(u.cached_tier)])


def _session_id(sid: str) -> str:
    if not ID_RE.fullmatch(sid):
        raise InvalidArgument("session_id must be 1..128 characters of [A-Za-z0-9._-]")
    return sid


class KvStashServicer(pb_grpc.KvStashServicer):
    def __init__(self, cfg: KvstashConfig, router: Router, auth: Authenticator, metrics: GatewayMetrics):
        self.cfg, self.router, self.auth, self.metrics = cfg, router, auth, metrics
        self.rate = TokenRate(cfg.quota.max_tokens_per_minute)

    # ---- request validation -----------------------------------------------------------------------
    def _input(self, msg, required: bool) -> dict | None:
        kind = msg.WhichOneof("kind") if msg is not None else None
        if kind is None:
            if required:
                raise InvalidArgument("input is required: set input.text, input.chat or input.token_ids")
            return None
        if kind == "text":
            if not msg.text.strip():
                raise InvalidArgument("input.text is empty")
            return {"text": msg.text}
        if kind == "chat":
            if not msg.chat.messages:
                raise InvalidArgument("input.chat has no messages")
            out = []
            for m in msg.chat.messages:
                if m.role not in ("system", "user", "assistant"):
                    raise InvalidArgument(f"input.chat role {m.role[:32]!r} must be system, user or assistant")
                out.append({"role": m.role, "content": m.content})
            return {"chat": out}
        if not msg.token_ids.ids:
            raise InvalidArgument("input.token_ids is empty")
        return {"token_ids": list(msg.token_ids.ids)}

    def _call(self, tenant: str, sid: str, create: bool, request, required: bool, context=None) -> GenerateCall:
        limit = self.cfg.session.max_new_tokens_limit
        if request.max_new_tokens < 0 or request.max_new_tokens > limit:
            raise InvalidArgument(f"max_new_tokens={request.max_new_tokens} must be in [0, {limit}] (0 = default)")
        s = request.sampling
        if not math.isfinite(s.temperature) or not 0 <= s.temperature <= 100:
            raise InvalidArgument("sampling.temperature must be in [0, 100]")
        if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
            raise InvalidArgument("sampling.top_p must be in [0, 1]")
        if len(request.stop) > MAX_STOPS:
            raise InvalidArgument(f"stop has {len(request.stop)} sequences, over the limit of {MAX_STOPS}")
        for st in request.stop:
            if not 1 <= len(st) <= MAX_STOP_CHARS:
                raise InvalidArgument(f"each stop sequence must be 1..{MAX_STOP_CHARS} characters")
        remaining = context.time_remaining() if context is not None else None
        return GenerateCall(tenant=tenant, session_id=sid, create=create, input=self._input(request.input, required),
                            max_new_tokens=request.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            seed=s.seed if s.HasField("seed") else None, stop=list(request.stop),
                            deadline=time.time() + remaining if remaining is not None else None,
                            fresh=create and not request.session_id)

    # ---- streaming calls --------------------------------------------------------------------------
    async def Generate(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        sid = _session_id(request.session_id) if request.session_id else uuid.uuid4().hex
        fork_of = _session_id(request.fork_of) if request.fork_of else ""
        if fork_of == sid:
            raise InvalidArgument("fork_of names the new session itself: a fork starts a new session")
        call = self._call(tenant, sid, create=True, request=request, required=not fork_of, context=context)
        call.fork_of = fork_of
        worker = await self.router.place(tenant, sid, call.input, fork_of=fork_of)
        async for msg in self._stream("Generate", call, worker):
            yield msg

    async def ResumeSession(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        call = self._call(tenant, _session_id(request.session_id), create=False, request=request, required=False,
                          context=context)
        async for msg in self._stream("ResumeSession", call, await self.router.place(tenant, call.session_id)):
            yield msg

    async def _stream(self, method: str, call: GenerateCall, worker: WorkerHandle):
        async for ev in self.events(method, call, worker):
            if isinstance(ev, TokensEvent):
                yield pb.GenerateResponse(session_id=call.session_id, token_ids=ev.ids, text=ev.text)
            else:
                yield pb.GenerateResponse(session_id=call.session_id, finish_reason=ev.finish_reason,
                                          usage=_usage(ev.usage))

    async def events(self, method: str, call: GenerateCall, worker: WorkerHandle):
        """The transport-neutral core of a generate call (gRPC and HTTP both use it): quota, metrics, the
        worker's event stream as `TokensEvent`s then one `DoneEvent`; errors raised as `KvstashError`s."""
        self.rate.check(call.tenant)
        t0 = last = time.perf_counter()
        first = True
        stream = worker.actor.generate.options(num_returns="streaming").remote(call)
        finished = False
        worker.inflight += 1
        try:
            async for ref in stream:
                ev = await ref
                if isinstance(ev, TokensEvent):
                    now = time.perf_counter()
                    (self.metrics.ttft if first else self.metrics.tpot).labels(method).observe(now - last if not first else now - t0)
                    first, last = False, now
                    yield ev
                elif isinstance(ev, DoneEvent):
                    finished = True
                    u = ev.usage
                    self.rate.add(call.tenant, u.prompt_tokens + u.generated_tokens)
                    self.metrics.tenant_tokens.labels(call.tenant, "prompt").inc(u.prompt_tokens)
                    self.metrics.tenant_tokens.labels(call.tenant, "generated").inc(u.generated_tokens)
                    yield ev
                    return
                else:
                    finished = True
                    err = ev.exception() if isinstance(ev, ErrorEvent) else Internal(
                        f"the worker sent {type(ev).__name__} on a generate stream")
                    if isinstance(err, NotFound):
                        self.router.forget(call.tenant, call.session_id)
                    raise err
        except ray.exceptions.RayActorError:
            self.router.mark_dead(worker)
            raise Unavailable("the worker serving this session died; retry (the session resumes from storage)") from None
        finally:
            worker.inflight -= 1
            if not finished:
                ray.cancel(stream)

    # ---- unary calls -----------------------------------------------------------------------------
    async def _on(self, worker: WorkerHandle, op: str, *args):
        """Run actor method `op` on `worker`; its result, or its `ErrorEvent` raised (UNAVAILABLE if it died)."""
        try:
            result = await getattr(worker.actor, op).remote(*args)
        except ray.exceptions.RayActorError:
            self.router.mark_dead(worker)
            raise Unavailable("the worker died; retry") from None
        if isinstance(result, ErrorEvent):
            raise result.exception()
        return result

    async def _control(self, op: str, tenant: str, sid: str, *args):
        worker = await self.router.locate(tenant, sid) or (await self.router.place(tenant, sid))
        try:
            return await self._on(worker, op, tenant, sid, *args)
        except NotFound:
            self.router.forget(tenant, sid)
            raise

    def _info(self, d: SessionInfo) -> pb.SessionInfo:
        cold = d.state == "cold"
        return pb.SessionInfo(
            session_id=d.session_id, state=_STATES[d.state], tier=pb.TIER_REDIS if cold else pb.TIER_DEVICE,
            token_count=d.token_count, worker=d.worker, created_at=d.created_at, last_used_at=d.last_used_at,
            pinned=d.pinned,
            bytes=[pb.TierBytes(tier=pb.TIER_DEVICE, bytes=d.device_bytes),
                   pb.TierBytes(tier=pb.TIER_REDIS, bytes=d.redis_bytes)])

    async def GetSession(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        return self._info(await self._control("info", tenant, _session_id(request.session_id)))

    async def EvictSession(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        sid = _session_id(request.session_id)
        await self._control("evict", tenant, sid)
        self.router.forget(tenant, sid)
        return self._info(await self._control("info", tenant, sid))

    async def PinSession(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        sid = _session_id(request.session_id)
        await self._control("pin", tenant, sid, bool(request.pinned))
        return self._info(await self._control("info", tenant, sid))

    async def ListSessions(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        size = request.page_size or 50
        if not 1 <= size <= 100:
            raise InvalidArgument(f"page_size={request.page_size} must be in [0, 100] (0 = 50)")
        token = request.page_token
        if token and not (token.isdigit() and len(token) <= 20 and int(token) < 1 << 64):
            raise InvalidArgument("page_token is not a token this server issued")
        live = self.router.live()
        if not live:
            raise Unavailable("no worker is available")
        page = await self._on(live[0], "list_sessions", tenant, int(token or 0), size)
        return pb.ListSessionsResponse(
            sessions=[pb.SessionInfo(session_id=d.session_id, token_count=d.token_count,
                                     created_at=d.created_at, last_used_at=d.last_used_at,
                                     bytes=[pb.TierBytes(tier=pb.TIER_REDIS, bytes=d.redis_bytes)])
                      for d in page.sessions],
            next_page_token=str(page.cursor) if page.cursor else "")

    async def MarkPublicPrefix(self, request, context):
        self.auth.admin(context.invocation_metadata())
        inp = self._input(request.input, required=True)
        live = self.router.live()
        if not live:
            raise Unavailable("no worker is available")
        worker = min(live, key=self.router.busy)
        res = await self._on(worker, "mark_public", inp)
        others = [w for w in self.router.live() if w is not worker]
        await asyncio.gather(*(w.actor.refresh_public.remote() for w in others), return_exceptions=True)
        return pb.MarkPublicPrefixResponse(prompt_tokens=res.prompt_tokens, shared_tokens=res.shared_tokens,
                                           newly_registered=res.newly_registered)

    async def DeleteSession(self, request, context):
        tenant = self.auth.tenant(context.invocation_metadata())
        sid = _session_id(request.session_id)
        deleted = await self._control("delete", tenant, sid)
        self.router.forget(tenant, sid)
        if not deleted:
            raise NotFound(f"session {sid!r} not found")
        return pb.DeleteSessionResponse(deleted=True)
