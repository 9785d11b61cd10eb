"""`ConversationIndex`: which session holds a stateless HTTP conversation, so its next turn continues it.

A client of the OpenAI API resends the whole conversation each turn. After a transparent (no explicit
session) chat call, the index maps the conversation *as the client will resend it* — the request's
messages plus the assistant reply — to the session that produced it. A later request whose messages
begin with such a conversation (cut after an assistant turn) is sent to that session as a continuation
(`GenerateCall.extends`): the worker checks, token by token, that the session's history begins the
request's rendering, and prefills only the rest.

Invariants:
- Keys are deterministic digests of the tenant and the length-prefixed (role, content) fields
  (`hash_fields`, never `hash()`); a tenant never finds another tenant's session.
- Each tenant holds at most `capacity` conversations (least recently used first out); `remember` returns
  the session ids that fell out for the caller to delete — so
  per-request sessions do not accumulate without bound (capacity 0: no reuse, each session is deleted
  after its call).
- The index is an optimisation in the gateway's memory: losing it (a restart) loses reuse, never data.
"""

from __future__ import annotations

from collections import OrderedDict

from kvstore.digest import hash_fields


def conversation_key(tenant: str, messages: list[dict[str, str]]) -> bytes:
    fields: list[str] = [tenant]
    for m in messages:
        fields += [m["role"], m["content"]]
    return hash_fields(fields, person=b"kvstash-conv")


class ConversationIndex:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.by_tenant: dict[str, OrderedDict[bytes, str]] = {}

    def find(self, tenant: str, messages: list[dict[str, str]]) -> tuple[bytes, str] | None:
        """The longest remembered conversation that `messages` extend (cut after an assistant turn, leaving at
        least one new message), as (key, session id), or None."""
        convs = self.by_tenant.get(tenant)
        if not convs:
            return None
        for j in range(len(messages) - 1, 0, -1):
            if messages[j - 1]["role"] != "assistant":
                continue
            key = conversation_key(tenant, messages[:j])
            if key in convs:
                convs.move_to_end(key)
                return key, convs[key]
        return None

    def remember(self, tenant: str, messages: list[dict[str, str]], reply: str, session_id: str,
                 superseded: bytes | None = None) -> list[str]:
        """Record that `session_id` now holds `messages` + the assistant `reply`; returns session ids to delete
        (the tenant's least recently used conversations over capacity). `superseded`: the key this session
        was found under (its history has moved on, so that key no longer describes it)."""
        convs = self.by_tenant.setdefault(tenant, OrderedDict())
        if superseded is not None and convs.get(superseded) == session_id:
            del convs[superseded]
        convs[conversation_key(tenant, [*messages, {"role": "assistant", "content": reply}])] = session_id
        gone = []
        while len(convs) > self.capacity:
            _, sid = convs.popitem(last=False)
            if sid not in convs.values():
                gone.append(sid)
        return gone

    def forget(self, tenant: str, key: bytes) -> None:
        convs = self.by_tenant.get(tenant)
        if convs is not None:
            convs.pop(key, None)

    def sessions(self, tenant: str) -> int:
        return len(self.by_tenant.get(tenant, ()))
