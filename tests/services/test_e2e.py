"""End to end over real gRPC sockets, real Ray actors and a real redis-server, on a tiny random model.

Every exactness check compares against an uninterrupted greedy run of the same prompt.
"""

import asyncio
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.client import KvstashClient

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "Tell me about the history of the printing press and its effect on Europe."}]
N, K = 64, 17


@pytest.fixture(scope="module")
def client(tiny_stack):
    with KvstashClient(tiny_stack.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def rdb(redis_server):
    return redis.Redis.from_url(redis_server.url)


@pytest.fixture(scope="module")
def reference(client):
    """An uninterrupted greedy run of N tokens."""
    out = client.generate(messages=PROMPT, max_new_tokens=N)
    assert len(out.token_ids) == N and out.finish_reason == "length"
    assert len(set(out.token_ids)) > 10, "degenerate model output would make exactness checks weak"
    return out


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def session_key(sid: str) -> str:
    from kvstore.tiers.key_layout import KeyLayout

    return KeyLayout("kvtest").session_key("default", sid)


def stored_blocks(rdb, sid: str) -> list[str]:
    """The Redis keys of the KV blocks a session's manifest lists (sealed blocks, then the tail)."""
    from kvstore.tiers.key_layout import KeyLayout
    from kvstore.tiers.manifest import SessionManifest

    m = SessionManifest.decode(rdb.hget(session_key(sid), "m"))
    return [KeyLayout("kvtest").block_key("default", r) for r in m.blocks]


def test_greedy_is_deterministic_and_streams(client, reference):
    chunks = list(client.generate_stream(messages=PROMPT, max_new_tokens=N))
    assert len(chunks) == N + 1  # one message per token, then the final one with usage
    assert [t for c in chunks for t in c.token_ids] == reference.token_ids
    last = chunks[-1]
    assert last.usage.generated_tokens == N and last.usage.kv_source == pb.KV_SOURCE_NEW
    assert last.usage.session_tokens == last.usage.prompt_tokens + N


def test_offload_then_resume_is_exact(client, reference, rdb, tiny_stack):
    first = client.generate(messages=PROMPT, max_new_tokens=K)
    sid = first.session_id
    assert first.token_ids == reference.token_ids[:K]
    hot = client.get_session(sid)
    assert hot.state == pb.SESSION_STATE_ACTIVE and hot.tier == pb.TIER_DEVICE
    device = {b.tier: b.bytes for b in hot.bytes}[pb.TIER_DEVICE]
    assert device > 0

    cold = client.evict_session(sid)
    assert cold.state == pb.SESSION_STATE_COLD and cold.tier == pb.TIER_REDIS
    sizes = {b.tier: b.bytes for b in cold.bytes}
    assert sizes[pb.TIER_DEVICE] == 0 and sizes[pb.TIER_REDIS] > 0
    fields = rdb.hgetall(session_key(sid))
    assert set(fields) == {b"m"}  # the manifest; the KV is in content blocks, each one key
    blocks = stored_blocks(rdb, sid)
    assert len(blocks) >= 1 and all(rdb.exists(k) for k in blocks)
    assert sizes[pb.TIER_REDIS] == len(fields[b"m"]) + sum(rdb.hstrlen(k, "d") + rdb.hstrlen(k, "c") for k in blocks)

    rest = client.resume(sid, max_new_tokens=N - K)
    assert first.token_ids + rest.token_ids == reference.token_ids
    assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED
    assert rest.usage.cached_tokens == first.usage.session_tokens - 1  # everything but the last sampled token
    assert rest.usage.prompt_tokens == 0


def test_resume_with_new_input_matches_a_session_that_stayed(client):
    follow = [{"role": "user", "content": "Now summarise that in one line."}]
    a = client.generate(messages=PROMPT, max_new_tokens=K)
    stayed = client.resume(a.session_id, messages=follow, max_new_tokens=30)
    assert stayed.usage.kv_source == pb.KV_SOURCE_DEVICE
    b = client.generate(messages=PROMPT, max_new_tokens=K)
    client.evict_session(b.session_id)
    moved = client.resume(b.session_id, messages=follow, max_new_tokens=30)
    assert moved.usage.kv_source == pb.KV_SOURCE_RESTORED
    assert moved.token_ids == stayed.token_ids


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_lost_or_corrupt_kv_is_recomputed_exactly(client, reference, rdb, tiny_stack, damage):
    first = client.generate(messages=PROMPT, max_new_tokens=K)
    sid = first.session_id
    client.evict_session(sid)
    key = stored_blocks(rdb, sid)[0]  # the first sealed block
    if damage == "missing":
        assert rdb.delete(key) == 1
    else:
        blob = bytearray(rdb.hget(key, "d"))
        if damage == "corrupt":
            blob[len(blob) // 2] ^= 0x01
        else:
            blob = blob[: len(blob) // 2]
        rdb.hset(key, "d", bytes(blob))
    reason = "missing" if damage == "missing" else "corrupt"
    before = metric_sum(metrics(tiny_stack.metrics_url), "kvstash_recomputes_total", reason=reason)
    rest = client.resume(sid, max_new_tokens=N - K)
    assert first.token_ids + rest.token_ids == reference.token_ids
    assert rest.usage.kv_source == pb.KV_SOURCE_RECOMPUTED
    deadline = time.monotonic() + 15
    while metric_sum(metrics(tiny_stack.metrics_url), "kvstash_recomputes_total", reason=reason) < before + 1:
        assert time.monotonic() < deadline, "recompute was not counted"
        time.sleep(0.3)


def test_delete_removes_the_session_everywhere(client, rdb):
    out = client.generate("Once upon a time", max_new_tokens=8)
    sid = out.session_id
    client.evict_session(sid)
    assert rdb.exists(session_key(sid)) == 1
    blocks = stored_blocks(rdb, sid)
    assert blocks and all(rdb.exists(k) for k in blocks)
    assert client.delete_session(sid) is True
    assert rdb.exists(session_key(sid)) == 0
    assert not any(rdb.exists(k) for k in blocks)  # its private blocks are collected with it
    for call in (lambda: client.get_session(sid), lambda: client.delete_session(sid), lambda: client.resume(sid)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_delete_of_a_hot_session(client, rdb):
    out = client.generate("The weather today", max_new_tokens=4)
    assert rdb.exists(session_key(out.session_id)) == 1  # durable history is written at the end of each call
    assert client.delete_session(out.session_id) is True
    assert rdb.exists(session_key(out.session_id)) == 0


@pytest.mark.parametrize("call,code,needle", [
    (lambda c: c.resume("no-such-session", max_new_tokens=4), "NOT_FOUND", "not found"),
    (lambda c: c.generate("", max_new_tokens=4), "INVALID_ARGUMENT", "input.text is empty"),
    (lambda c: c.generate(max_new_tokens=4), "INVALID_ARGUMENT", "input is required"),
    (lambda c: c.generate("hi", max_new_tokens=-1), "INVALID_ARGUMENT", "max_new_tokens"),
    (lambda c: c.generate("hi", max_new_tokens=10**9), "INVALID_ARGUMENT", "max_new_tokens"),
    (lambda c: c.generate("hi", session_id="bad id!"), "INVALID_ARGUMENT", "session_id"),
    (lambda c: c.generate("hi", temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
    (lambda c: c.generate(token_ids=[10**9]), "INVALID_ARGUMENT", "outside the vocabulary"),
    (lambda c: c.generate(messages=[{"role": "robot", "content": "x"}]), "INVALID_ARGUMENT", "role"),
    (lambda c: c.generate("hi", stop=["x"] * 9), "INVALID_ARGUMENT", "over the limit of 8"),
    (lambda c: c.generate("hi", stop=["y" * 257]), "INVALID_ARGUMENT", "1..256 characters"),
    (lambda c: c.evict_session("nope"), "NOT_FOUND", "not found"),
])
def test_bad_input_gets_a_clear_status_and_the_gateway_keeps_serving(client, call, code, needle):
    with pytest.raises(grpc.RpcError) as e:
        call(client)
    assert e.value.code() == grpc.StatusCode[code]
    assert needle in e.value.details()
    assert len(client.generate("Still alive?", max_new_tokens=3).token_ids) == 3


def test_text_and_token_inputs_and_sampling(client):
    a = client.generate("The quick brown fox", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    b = client.generate("The quick brown fox", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids  # a seed makes sampling reproducible
    t = client.generate(token_ids=[1, 2, 3, 4, 5], max_new_tokens=5)
    assert len(t.token_ids) == 5 and t.usage.prompt_tokens == 5


def test_idle_sessions_are_offloaded(client):
    out = client.generate("Idle session", max_new_tokens=5)
    deadline = time.monotonic() + 60
    while client.get_session(out.session_id).state != pb.SESSION_STATE_COLD:
        assert time.monotonic() < deadline, "idle session was never offloaded"
        time.sleep(0.5)
    rest = client.resume(out.session_id, max_new_tokens=3)
    assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED


def test_health_service(tiny_stack):
    with grpc.insecure_channel(tiny_stack.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvstash.v1.KvStash"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint(client, tiny_stack, reference):
    sid = client.generate("metrics", max_new_tokens=6).session_id
    client.evict_session(sid)
    client.resume(sid, max_new_tokens=2)
    deadline = time.monotonic() + 15
    while True:
        m = metrics(tiny_stack.metrics_url)
        names = {n for n, _ in m}
        want = {"kvstash_kv_bytes", "kvstash_sessions", "kvstash_offloads_total", "kvstash_restores_total",
                "kvstash_recomputes_total", "kvstash_time_to_first_token_seconds_bucket",
                "kvstash_time_per_output_token_seconds_bucket", "kvstash_storage_up", "kvstash_requests_total"}
        if want <= names and metric_sum(m, "kvstash_restores_total") >= 1:
            break
        assert time.monotonic() < deadline, f"missing metrics: {want - names}"
        time.sleep(0.3)
    assert metric_sum(m, "kvstash_kv_bytes", tier="redis") > 0
    assert any(("tier", "device") in ls and ("worker", "w0") in ls for n, ls in m if n == "kvstash_kv_bytes")
    assert metric_sum(m, "kvstash_offloads_total") >= 1
    assert metric_sum(m, "kvstash_storage_up") == 1
    assert metric_sum(m, "kvstash_time_to_first_token_seconds_count", method="Generate") >= 1
    assert metric_sum(m, "kvstash_tenant_tokens_total", tenant="default", kind="generated") >= 8


def test_backpressure_refuses_with_a_retry_hint(tiny_stack):
    """Each of the 2 workers runs at most 3 calls (session.max_requests_per_worker); the rest are refused."""
    from services.api.kvstash.v1 import kvstash_pb2_grpc as pb_grpc
    from services.client import generate_request

    async def one(stub):
        try:
            async for _ in stub.Generate(generate_request("count slowly: one two three", max_new_tokens=300)):
                pass
            return "OK", None
        except grpc.aio.AioRpcError as e:
            return e.code().name, dict(e.trailing_metadata() or ())

    async def burst():
        async with grpc.aio.insecure_channel(tiny_stack.target) as ch:
            stub = pb_grpc.KvStashStub(ch)
            return await asyncio.gather(*(one(stub) for _ in range(12)))

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert 1 <= codes.count("OK") <= 6 and codes.count("RESOURCE_EXHAUSTED") >= 6
    assert all(md.get("retry-after-ms") == "1000" for c, md in results if c == "RESOURCE_EXHAUSTED")
    with KvstashClient(tiny_stack.target, timeout=120) as c:  # capacity comes back
        assert c.generate("hello again", max_new_tokens=2).finish_reason


def test_pinned_sessions_outlive_the_idle_timer(client):
    pinned = client.generate("pin me", max_new_tokens=2).session_id
    free = client.generate("leave me", max_new_tokens=2).session_id
    info = client.pin_session(pinned)
    assert info.pinned and info.state == pb.SESSION_STATE_ACTIVE
    deadline = time.monotonic() + 30  # idle timeout 8 s in this stack
    while client.get_session(free).state != pb.SESSION_STATE_COLD:
        assert time.monotonic() < deadline, "the unpinned session was never offloaded"
        time.sleep(0.5)
    assert client.get_session(pinned).state == pb.SESSION_STATE_ACTIVE and client.get_session(pinned).pinned
    assert not client.pin_session(pinned, False).pinned
    with pytest.raises(grpc.RpcError) as e:
        client.pin_session("no-such-session")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_sessions_pages_and_is_tenant_scoped(client, tiny_stack):
    mine = {client.generate(f"list me {i}", max_new_tokens=2).session_id for i in range(7)}
    listed = {s.session_id: s for s in client.list_sessions(page_size=3)}
    assert mine <= set(listed)
    assert all(listed[sid].token_count > 2 and listed[sid].bytes[0].bytes > 0 for sid in mine)
    with pytest.raises(grpc.RpcError) as e:
        list(client.list_sessions(page_size=101))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in e.value.details()


def test_stop_sequences_cut_the_text_and_the_session_goes_on(client, reference):
    words = reference.text.split()
    stop = next(w for w in words[3:] if len(w) >= 3)  # a word the greedy run really produces, not at the start
    out = client.generate(messages=PROMPT, max_new_tokens=N, stop=["@@never@@", stop])
    assert out.finish_reason == "stop_sequence"
    assert out.text == reference.text[:reference.text.find(stop)]  # cut just before the stop, never streamed
    assert out.token_ids == reference.token_ids[:len(out.token_ids)] and len(out.token_ids) < N
    more = client.resume(out.session_id, max_new_tokens=3)  # the tokens that produced the stop stay in history
    assert more.token_ids == reference.token_ids[len(out.token_ids):len(out.token_ids) + 3]


def test_quality_probe_metrics_per_layer(client, tiny_stack):
    """With kv.quality_sample_rate=1 every decode step whose window holds a whole key group is probed."""
    client.generate("word " * 40, max_new_tokens=4)
    deadline = time.monotonic() + 15
    while True:
        m = metrics(tiny_stack.metrics_url)
        if metric_sum(m, "kvstash_quality_probes_total") >= 3:
            break
        assert time.monotonic() < deadline, "no quality probes exported"
        time.sleep(0.3)
    layers = {dict(ls)["layer"] for n, ls in m if n == "kvstash_quality_attention_kl_count"}
    assert layers == {"0", "1"}  # the tiny model's two layers
    for name in ("kvstash_quality_attention_kl_count", "kvstash_quality_attention_relative_error_count"):
        assert metric_sum(m, name) >= 2 * 3
    assert 0 < metric_sum(m, "kvstash_quality_attention_relative_error_sum") < metric_sum(
        m, "kvstash_quality_attention_relative_error_count")  # mean relative error below 1


def quiesce(client, url: str) -> None:
    """Offload every hot session and wait until both workers are idle and the gateway has polled that,
    so that the next placements depend on nothing earlier tests left running."""
    for s in client.list_sessions():
        if s.state == pb.SESSION_STATE_ACTIVE:
            client.evict_session(s.session_id)
    deadline = time.monotonic() + 30
    while metric_sum(metrics(url), "kvstash_worker_queue_depth") > 0:
        assert time.monotonic() < deadline, "the workers never went idle"
        time.sleep(0.2)
    time.sleep(1.5)  # three gateway load polls (gateway.metrics_poll_interval_s = 0.5 in this stack)


def test_two_workers_share_the_load_and_sessions_move_between_them(client, tiny_stack):
    # Raw prompts that differ from their first token: no worker holds any of them hot, so prefix
    # locality has nothing to say and each new session goes to the least-loaded worker (ties rotate).
    prompts = [f"{w} are the subject here, so tell me everything about them."
               for w in ("Lighthouses", "Glaciers", "Volcanoes", "Orchards")]
    quiesce(client, tiny_stack.metrics_url)
    placed, tokens = {}, {}
    for p in prompts:
        out = client.generate(p, max_new_tokens=K)
        placed[out.session_id] = client.get_session(out.session_id).worker
        tokens[out.session_id] = (p, list(out.token_ids))
    assert set(placed.values()) == {"w0", "w1"}, placed  # new sessions go to the least-loaded worker
    for sid, worker in placed.items():
        more = client.resume(sid, max_new_tokens=2)
        assert more.usage.kv_source == pb.KV_SOURCE_DEVICE  # affinity: served where it is hot
        assert client.get_session(sid).worker == worker
        tokens[sid][1].extend(more.token_ids)
    # Once cold, a session resumes on whichever worker is least loaded, restored from Redis, still exact.
    for sid, (p, so_far) in tokens.items():
        client.evict_session(sid)
        rest = client.resume(sid, max_new_tokens=N - K - 2)
        assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED
        assert client.get_session(sid).worker in {"w0", "w1"}
        whole = client.generate(p, max_new_tokens=N)  # an uninterrupted run of the same prompt
        assert so_far + list(rest.token_ids) == list(whole.token_ids)
