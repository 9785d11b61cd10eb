"""Python client for the kvstash gateway, sync (`KvstashClient`) and asyncio (`AsyncKvstashClient`).

    with KvstashClient("127.0.0.1:50051") as c:
        out = c.generate("Hello", max_new_tokens=16)          # Completion: session_id, token_ids, text, usage
        more = c.resume(out.session_id, messages=[{"role": "user", "content": "And then?"}])
        for chunk in c.generate_stream("Tell me a story"):   # kvstash.v1.GenerateResponse messages
            print(chunk.text, end="")

Errors surface as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.api.kvstash.v1 import kvstash_pb2_grpc as pb_grpc


@dataclass
class Completion:
    session_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: pb.Usage | None = None

    def add(self, msg: pb.GenerateResponse) -> None:
        self.session_id = msg.session_id or self.session_id
        self.token_ids.extend(msg.token_ids)
        self.text += msg.text
        if msg.finish_reason:
            self.finish_reason = msg.finish_reason
        if msg.HasField("usage"):
            self.usage = msg.usage


def make_input(prompt: str | None = None, messages: list[dict] | None = None,
               token_ids: list[int] | None = None) -> pb.Input | None:
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) > 1:
        raise ValueError("give at most one of prompt, messages, token_ids")
    if prompt is not None:
        return pb.Input(text=prompt)
    if messages is not None:
        return pb.Input(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]))
    if token_ids is not None:
        return pb.Input(token_ids=pb.TokenIds(ids=token_ids))
    return None


def _sampling(temperature: float, top_p: float, seed: int | None) -> pb.SamplingParams:
    s = pb.SamplingParams(temperature=temperature, top_p=top_p)
    if seed is not None:
        s.seed = seed
    return s


def _tls(ca_file: str) -> grpc.ChannelCredentials:
    """TLS credentials trusting `ca_file` (PEM), or the system roots when it is empty."""
    if not ca_file:
        return grpc.ssl_channel_credentials()
    with open(ca_file, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def generate_request(prompt=None, *, messages=None, token_ids=None, session_id: str = "", max_new_tokens: int = 0,
                     temperature: float = 0.0, top_p: float = 0.0, seed: int | None = None,
                     stop: list[str] | None = None, fork_of: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=session_id, input=make_input(prompt, messages, token_ids),
                              max_new_tokens=max_new_tokens,
                              sampling=_sampling(temperature, top_p, seed), stop=stop or [], fork_of=fork_of)


def resume_request(session_id: str, prompt=None, *, messages=None, token_ids=None, max_new_tokens: int = 0,
                   temperature: float = 0.0, top_p: float = 0.0, seed: int | None = None,
                   stop: list[str] | None = None) -> pb.ResumeSessionRequest:
    return pb.ResumeSessionRequest(session_id=session_id, input=make_input(prompt, messages, token_ids),
                                   max_new_tokens=max_new_tokens, sampling=_sampling(temperature, top_p, seed),
                                   stop=stop or [])


class KvstashClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = None,
                 tls_ca_file: str | None = None):
        self.channel = (grpc.secure_channel(target, _tls(tls_ca_file)) if tls_ca_file is not None
                        else grpc.insecure_channel(target))
        self.stub = pb_grpc.KvStashStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.timeout = timeout

    def _kw(self) -> dict:
        return {"metadata": self.metadata, "timeout": self.timeout}

    def generate_stream(self, prompt=None, **kw) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(generate_request(prompt, **kw), **self._kw())

    def resume_stream(self, session_id: str, prompt=None, **kw) -> Iterator[pb.GenerateResponse]:
        return self.stub.ResumeSession(resume_request(session_id, prompt, **kw), **self._kw())

    def generate(self, prompt=None, **kw) -> Completion:
        out = Completion()
        for msg in self.generate_stream(prompt, **kw):
            out.add(msg)
        return out

    def resume(self, session_id: str, prompt=None, **kw) -> Completion:
        out = Completion(session_id=session_id)
        for msg in self.resume_stream(session_id, prompt, **kw):
            out.add(msg)
        return out

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), **self._kw())

    def evict_session(self, session_id: str) -> pb.SessionInfo:
        return self.stub.EvictSession(pb.EvictSessionRequest(session_id=session_id), **self._kw())

    def pin_session(self, session_id: str, pinned: bool = True) -> pb.SessionInfo:
        return self.stub.PinSession(pb.PinSessionRequest(session_id=session_id, pinned=pinned), **self._kw())

    def list_sessions(self, page_size: int = 0) -> Iterator[pb.SessionInfo]:
        """Every session of the caller's tenant, following page tokens."""
        token = ""
        while True:
            page = self.stub.ListSessions(pb.ListSessionsRequest(page_size=page_size, page_token=token), **self._kw())
            yield from page.sessions
            if not (token := page.next_page_token):
                return

    def delete_session(self, session_id: str) -> bool:
        return self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), **self._kw()).deleted

    def mark_public_prefix(self, prompt=None, *, messages=None, token_ids=None) -> pb.MarkPublicPrefixResponse:
        """Operators: share a prompt prefix (e.g. a system prompt) with every tenant."""
        return self.stub.MarkPublicPrefix(pb.MarkPublicPrefixRequest(input=make_input(prompt, messages, token_ids)),
                                          **self._kw())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KvstashClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncKvstashClient:
    def __init__(self, target: str, api_key: str | None = None, timeout: float | None = None,
                 tls_ca_file: str | None = None):
        self.channel = (grpc.aio.secure_channel(target, _tls(tls_ca_file)) if tls_ca_file is not None
                        else grpc.aio.insecure_channel(target))
        self.stub = pb_grpc.KvStashStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.timeout = timeout

    def _kw(self) -> dict:
        return {"metadata": self.metadata, "timeout": self.timeout}

    def generate_stream(self, prompt=None, **kw) -> AsyncIterator[pb.GenerateResponse]:
        return self.stub.Generate(generate_request(prompt, **kw), **self._kw())

    def resume_stream(self, session_id: str, prompt=None, **kw) -> AsyncIterator[pb.GenerateResponse]:
        return self.stub.ResumeSession(resume_request(session_id, prompt, **kw), **self._kw())

    async def generate(self, prompt=None, **kw) -> Completion:
        out = Completion()
        async for msg in self.generate_stream(prompt, **kw):
            out.add(msg)
        return out

    async def resume(self, session_id: str, prompt=None, **kw) -> Completion:
        out = Completion(session_id=session_id)
        async for msg in self.resume_stream(session_id, prompt, **kw):
            out.add(msg)
        return out

    async def get_session(self, session_id: str) -> pb.SessionInfo:
        return await self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), **self._kw())

    async def pin_session(self, session_id: str, pinned: bool = True) -> pb.SessionInfo:
        return await self.stub.PinSession(pb.PinSessionRequest(session_id=session_id, pinned=pinned), **self._kw())

    async def list_sessions(self, page_size: int = 0) -> list[pb.SessionInfo]:
        """Every session of the caller's tenant, following page tokens."""
        out, token = [], ""
        while True:
            page = await self.stub.ListSessions(pb.ListSessionsRequest(page_size=page_size, page_token=token),
                                                **self._kw())
            out += page.sessions
            if not (token := page.next_page_token):
                return out

    async def evict_session(self, session_id: str) -> pb.SessionInfo:
        return await self.stub.EvictSession(pb.EvictSessionRequest(session_id=session_id), **self._kw())

    async def delete_session(self, session_id: str) -> bool:
        return (await self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), **self._kw())).deleted

    async def mark_public_prefix(self, prompt=None, *, messages=None, token_ids=None) -> pb.MarkPublicPrefixResponse:
        """Operators: share a prompt prefix (e.g. a system prompt) with every tenant."""
        return await self.stub.MarkPublicPrefix(
            pb.MarkPublicPrefixRequest(input=make_input(prompt, messages, token_ids)), **self._kw())

    async def close(self) -> None:
        await self.channel.close()
