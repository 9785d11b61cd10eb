"""`ConversationIndex`: continuation lookup, tenant scoping and the bounded lifecycle of per-request sessions."""

from services.gateway.conversations import ConversationIndex, conversation_key

SYS = {"role": "system", "content": "be brief"}


def u(text):
    return {"role": "user", "content": text}


def test_a_conversation_is_found_by_its_extension_only_within_its_tenant():
    idx = ConversationIndex(capacity=4)
    assert idx.remember("alpha", [SYS, u("hi")], "hello", "s1") == []
    turn2 = [SYS, u("hi"), {"role": "assistant", "content": "hello"}, u("how are you?")]
    key, sid = idx.find("alpha", turn2)
    assert sid == "s1" and key == conversation_key("alpha", turn2[:3])
    assert idx.find("beta", turn2) is None
    assert idx.find("alpha", [SYS, u("hi"), {"role": "assistant", "content": "hullo"}, u("x")]) is None
    assert idx.find("alpha", [SYS, u("hi")]) is None  # nothing new to continue with


def test_a_continued_conversation_supersedes_its_old_key():
    idx = ConversationIndex(capacity=4)
    idx.remember("alpha", [u("a")], "b", "s1")
    turn2 = [u("a"), {"role": "assistant", "content": "b"}, u("c")]
    key, _ = idx.find("alpha", turn2)
    assert idx.remember("alpha", turn2, "d", "s1", superseded=key) == []
    assert idx.sessions("alpha") == 1
    assert idx.find("alpha", turn2) is None  # the session moved on: the older history is not it any more
    assert idx.find("alpha", [*turn2, {"role": "assistant", "content": "d"}, u("e")])[1] == "s1"


def test_sessions_beyond_capacity_are_returned_for_deletion():
    idx = ConversationIndex(capacity=2)
    gone = [g for i in range(5) for g in idx.remember("alpha", [u(str(i))], "ok", f"s{i}")]
    assert gone == ["s0", "s1", "s2"] and idx.sessions("alpha") == 2
    none = ConversationIndex(capacity=0)
    assert none.remember("alpha", [u("x")], "y", "s9") == ["s9"]  # no reuse: deleted after its call


def test_keys_are_length_prefixed():
    assert conversation_key("t", [u("ab"), u("c")]) != conversation_key("t", [u("a"), u("bc")])
    assert conversation_key("t", [u("x")]) == conversation_key("t", [u("x")])
