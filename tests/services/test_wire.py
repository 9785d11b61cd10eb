"""`services.wire`: the gateway<->worker messages and the names both sides share."""

import pickle

import pytest

from kvstore.tiers import manifest
from services import wire
from services.errors import NotFound, ResourceExhausted
from services.gateway.servicer import SOURCES, TIERS
from services.worker import stops


def test_the_id_rule_is_the_manifests():
    assert wire.ID_RE.pattern == manifest.ID_RE.pattern and wire.ID_RE.flags == manifest.ID_RE.flags


def test_stop_limits_are_the_wires():
    assert (stops.MAX_STOPS, stops.MAX_STOP_CHARS) == (wire.MAX_STOPS, wire.MAX_STOP_CHARS)


def test_every_source_and_tier_maps_to_the_proto():
    assert set(SOURCES) == set(wire.KvSource) and len(set(SOURCES.values())) == len(wire.KvSource)
    assert set(TIERS) == set(wire.Tier) and len(set(TIERS.values())) == len(wire.Tier)
    assert [s.value for s in wire.KvSource] == ["new", "device", "restored", "recomputed", "prefix"]
    assert [t.value for t in wire.Tier] == ["", "device", "host", "redis"]


def test_usage_holds_plain_strings_and_refuses_unknown_names():
    u = wire.Usage(3, 1, 2, wire.KvSource.PREFIX, 6, wire.Tier.HOST)
    assert type(u.kv_source) is str and type(u.cached_tier) is str and (u.kv_source, u.cached_tier) == ("prefix", "host")
    with pytest.raises(ValueError):
        wire.Usage(3, 1, 2, "from-nowhere", 6)
    with pytest.raises(ValueError):
        wire.Usage(3, 1, 2, "new", 6, "disk")


def test_errors_travel_as_data_and_come_back_as_their_class():
    ev = wire.ErrorEvent.of(ResourceExhausted("busy", retry_after_s=1))
    assert (ev.code, ev.message, ev.retry_after_s) == ("RESOURCE_EXHAUSTED", "busy", 1.0)
    back = ev.exception()
    assert isinstance(back, ResourceExhausted) and back.message == "busy" and back.retry_after_s == 1.0
    assert isinstance(wire.ErrorEvent("NOT_FOUND", "gone").exception(), NotFound)
    assert wire.ErrorEvent("NO_SUCH_CODE", "?").exception().code == "INTERNAL"


def test_messages_are_dataclasses_of_builtins():
    """What crosses Ray: every field a builtin or another wire message (Ray pickles them in its transport)."""
    done = wire.DoneEvent("stop", wire.Usage(3, 0, 1, "new", 4))
    msgs = [wire.GenerateCall("t", "s", True, {"token_ids": [1, 2]}, stop=["x"]), wire.TokensEvent([5], "hi"), done,
            wire.PrefixSharedEvent(600, 512, True), wire.ErrorEvent("INTERNAL", "boom"),
            wire.WorkerReady("w0", "f" * 64, "cpu"), wire.WorkerLoad(2, 1 << 20, 1),
            wire.SessionInfo("s", "active", 12, 4096, 0, "w0", 1.0, 2.0, True),
            wire.SessionPage(7, [wire.StoredSession("s", 12, 1.0, 2.0, 512)]), wire.StorageStats(512, 1, 1)]
    builtin = (str, int, float, bool, type(None), list, dict)

    def plain(v):
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(plain(k) and plain(x) for k, x in v.items())
        if type(v).__module__ == wire.__name__:
            return all(plain(x) for x in vars(v).values())
        return type(v) in builtin
    for m in msgs:
        assert plain(m), m
        assert pickle.loads(pickle.dumps(m)) == m
    assert [wire.is_terminal(m) for m in msgs[:5]] == [False, False, True, True, True]
    assert wire.actor_name(3) == wire.ACTOR_PREFIX + "3"
