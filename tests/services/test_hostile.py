"""Hostile input over real gRPC: fuzzed fields of every RPC, invalid UTF-8, raw garbage and truncated HTTP/2
frames, oversize messages. Each gets a clear status (never INTERNAL or UNKNOWN), and every test checks after
its own cases that the server stayed healthy (so each test holds alone, in any order)."""

import random
import socket
import struct

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.api.kvstash.v1 import kvstash_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e
CLEAR = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}

ids = st.one_of(st.text(max_size=200), st.sampled_from(["", "ok-id", "a" * 128, "a" * 129, "../x", "s}{t", "\x00"]),
                st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e30]))
small_or_wild = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))
token_lists = st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 50000)), max_size=300)
texts = st.one_of(st.text(max_size=500), st.just(""), st.just("x" * 60000))
chats = st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=10)),
                           content=st.text(max_size=200)), max_size=5)
inputs = st.one_of(st.none(), st.builds(lambda t: pb.Input(text=t), texts),
                   st.builds(lambda c: pb.Input(chat=pb.ChatMessages(messages=c)), chats),
                   st.builds(lambda x: pb.Input(token_ids=pb.TokenIds(ids=x)), token_lists))
sampling = st.builds(lambda t, p, s: pb.SamplingParams(temperature=t, top_p=p, **({} if s is None else {"seed": s})),
                     floats, floats, st.one_of(st.none(), st.integers(0, 2**64 - 1)))
stops = st.lists(st.one_of(st.text(max_size=300), st.just("")), max_size=10)


def _req(cls, sid, inp, n, smp, stop):
    kw = {"session_id": sid, "max_new_tokens": n, "sampling": smp, "stop": stop}
    if inp is not None:
        kw["input"] = inp
    return cls(**kw)


@pytest.fixture(scope="module")
def stub(tiny_stack):
    with grpc.insecure_channel(tiny_stack.target) as ch:
        yield pb_grpc.KvStashStub(ch)


def _code(call) -> str:
    try:
        r = call()
        if hasattr(r, "__iter__") and not isinstance(r, (pb.SessionInfo, pb.DeleteSessionResponse)):
            for _ in r:
                pass
        return "OK"
    except grpc.RpcError as e:
        assert e.details(), f"{e.code()} without a message"
        return e.code().name


def _healthy(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kvstash.v1.KvStash"),
                                                    timeout=30)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def test_fuzzed_generate_and_resume_get_clear_statuses(stub, tiny_stack):
    tried = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sid=ids, inp=inputs, n=small_or_wild, smp=sampling, stop=stops, which=st.sampled_from(["gen", "resume"]))
    def case(sid, inp, n, smp, stop, which):
        tried.append(which)
        cls, rpc = ((pb.GenerateRequest, stub.Generate) if which == "gen"
                    else (pb.ResumeSessionRequest, stub.ResumeSession))
        code = _code(lambda: rpc(_req(cls, sid, inp, n, smp, stop), timeout=120))
        assert code in CLEAR, code

    case()
    assert len(tried) >= 60  # every example ran (a passing run stops at max_examples)
    assert _healthy(tiny_stack.target)


def test_fuzzed_unary_calls_get_clear_statuses(stub, tiny_stack):
    tried = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sid=ids, page=st.integers(0, 2**32 - 1), token=st.text(max_size=40), pin=st.booleans(),
           which=st.sampled_from(["get", "delete", "evict", "pin", "list", "public"]))
    def case(sid, page, token, pin, which):
        tried.append(which)
        calls = {
            "get": lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=60),
            "delete": lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=60),
            "evict": lambda: stub.EvictSession(pb.EvictSessionRequest(session_id=sid), timeout=60),
            "pin": lambda: stub.PinSession(pb.PinSessionRequest(session_id=sid, pinned=pin), timeout=60),
            "list": lambda: stub.ListSessions(pb.ListSessionsRequest(page_size=page, page_token=token), timeout=60),
            "public": lambda: stub.MarkPublicPrefix(pb.MarkPublicPrefixRequest(input=pb.Input(text=token)),
                                                    timeout=60),
        }
        assert _code(calls[which]) in CLEAR

    case()
    assert len(tried) >= 40
    assert _healthy(tiny_stack.target)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def test_invalid_utf8_and_undecodable_messages_are_invalid_argument(tiny_stack):
    bad_string = b"\xff\xfe\x80"
    messages = [b"\x0a" + _varint(len(bad_string)) + bad_string,  # session_id (field 1) not UTF-8
                b"\x12\x05\x0a\x03" + bad_string,  # input.text not UTF-8
                b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
                bytes(random.Random(5).randbytes(300))]
    with grpc.insecure_channel(tiny_stack.target) as ch:
        raw = ch.unary_stream("/kvstash.v1.KvStash/Generate", request_serializer=None, response_deserializer=None)
        unary = ch.unary_unary("/kvstash.v1.KvStash/GetSession", request_serializer=None, response_deserializer=None)
        for m in messages:
            for call in (lambda m=m: list(raw(m, timeout=30)), lambda m=m: unary(m, timeout=30)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,), (m[:10], e.value.details())
    assert _healthy(tiny_stack.target)


def test_raw_garbage_truncated_frames_and_oversize_messages_leave_the_server_up(tiny_stack):
    host, port = tiny_stack.target.rsplit(":", 1)
    rng = random.Random(9)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = struct.pack(">I", 0)[1:] + b"\x04\x00" + struct.pack(">I", 0)
    payloads = [rng.randbytes(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", preface,
                preface + settings_frame + b"\x00\x10\x00\x01",  # a HEADERS frame header, then nothing
                preface + settings_frame + struct.pack(">I", 0xFFFFFF)[1:] + b"\x00\x00" + b"\x00" * 4 + rng.randbytes(100),
                b"\x00" * 65536]
    for p in payloads:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            try:
                s.sendall(p)
                s.shutdown(socket.SHUT_WR)
                s.recv(65536)
            except OSError:
                pass  # the server may just drop us: fine
    with grpc.insecure_channel(tiny_stack.target) as ch:
        stub = pb_grpc.KvStashStub(ch)
        with pytest.raises(grpc.RpcError) as e:  # 5 MB > gateway.max_message_bytes (4 MiB)
            list(stub.Generate(pb.GenerateRequest(input=pb.Input(text="x" * (5 << 20))), timeout=60))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _healthy(tiny_stack.target)
