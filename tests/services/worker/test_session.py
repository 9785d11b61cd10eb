"""`Session`: calls are atomic; manifests written while a call runs record the committed history."""

from services.worker.session import Session


def test_a_running_call_is_invisible_to_the_manifest_until_it_commits():
    s = Session("acme", "s", tokens=[1, 2, 3], schedule=[2])
    s.begin()
    assert s.busy and s.durable_tokens == 3
    s.tokens += [4, 5]
    s.schedule += [1, 1]
    m = s.manifest("fp", "int4")
    assert (m.tokens, m.schedule) == ([1, 2, 3], [2])  # e.g. a pin or an epoch write-back mid-call
    s.commit()
    m = s.manifest("fp", "int4")
    assert (m.tokens, m.schedule) == ([1, 2, 3, 4, 5], [2, 1, 1]) and s.durable_tokens == 5
    s.end()
    assert not s.busy


def test_rollback_returns_the_session_to_where_the_call_began():
    s = Session("acme", "s", tokens=[1, 2, 3], schedule=[2])
    s.begin()
    assert not s.rollback()  # nothing ran yet
    s.tokens += [4, 5]
    s.schedule = [3]  # e.g. a call that adopted a stored prefix rewrote the schedule
    assert s.rollback()
    assert (s.tokens, s.schedule) == ([1, 2, 3], [2])
    s.end()
    assert (s.manifest("fp", "int4").tokens, s.durable_tokens) == ([1, 2, 3], 3)


class CountingCache:
    """What Session.device_bytes reads of a cache: its length and its measured bytes (counted)."""

    def __init__(self, n):
        self.n, self.walks = n, 0

    def get_seq_length(self):
        return self.n

    def device_bytes(self):
        self.walks += 1
        return 100 * self.n


def test_an_idle_sessions_device_bytes_are_measured_once_until_its_cache_changes():
    c = CountingCache(3)
    s = Session("acme", "s", tokens=[1, 2, 3], schedule=[3], cache=c)
    assert s.device_bytes() == s.device_bytes() == 300 and c.walks == 1  # idle: remembered
    c.n = 4  # the cache grew (a call fed it)
    assert s.device_bytes() == 400 and c.walks == 2
    s.begin()  # a running call changes the cache at every step: measured each time
    assert s.device_bytes() == s.device_bytes() == 400 and c.walks == 4
    s.end()
    s.cache = other = CountingCache(4)  # another cache of the same length (e.g. restored)
    assert s.device_bytes() == 400 and other.walks == 1
    s.cache = None
    assert s.device_bytes() == 0 and s._bytes_seen is None
