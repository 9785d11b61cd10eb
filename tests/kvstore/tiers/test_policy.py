"""`OffloadPolicy.victims` (idle first, then least recently used down to the device budget; never a busy
or pinned session) and `RestoreCost` (EWMA of measured costs; load only when it is cheaper)."""

from kvstore.tiers.policy import OffloadPolicy, Resident, RestoreCost


def _r(name: str, last_used: float, nbytes: int = 100, **flags) -> Resident:
    return Resident(("t", name), last_used, nbytes, **flags)


def test_idle_sessions_leave_oldest_first_and_the_timeout_is_inclusive():
    policy = OffloadPolicy(idle_timeout_s=10)
    sessions = [_r("fresh", 95), _r("edge", 90), _r("old", 50), _r("older", 20)]
    assert policy.victims(sessions, now=100) == [("t", "older"), ("t", "old"), ("t", "edge")]


def test_busy_and_pinned_sessions_never_leave_however_idle():
    policy = OffloadPolicy(idle_timeout_s=1, device_budget_bytes=1)
    sessions = [_r("busy", 0, busy=True), _r("pinned", 0, pinned=True), _r("idle", 5)]
    assert policy.victims(sessions, now=100) == [("t", "idle")]


def test_without_a_budget_only_idleness_counts():
    policy = OffloadPolicy(idle_timeout_s=60, device_budget_bytes=0)
    sessions = [_r("a", 10, nbytes=10**12), _r("b", 20, nbytes=10**12)]
    assert policy.victims(sessions, now=30) == []


def test_over_the_budget_least_recently_used_leave_until_it_fits():
    policy = OffloadPolicy(idle_timeout_s=1000, device_budget_bytes=250)
    sessions = [_r("new", 40), _r("mid", 30), _r("old", 20), _r("oldest", 10)]  # 400 bytes, none idle
    assert policy.victims(sessions, now=50) == [("t", "oldest"), ("t", "old")]  # 400 -> 300 -> 200


def test_idle_victims_count_toward_the_budget_before_any_lru_one():
    policy = OffloadPolicy(idle_timeout_s=10, device_budget_bytes=200)
    sessions = [_r("idle", 50, nbytes=150), _r("a", 95, nbytes=100), _r("b", 96, nbytes=100)]
    assert policy.victims(sessions, now=100) == [("t", "idle")]  # 350 - 150 = 200 fits: a and b stay
    tighter = OffloadPolicy(idle_timeout_s=10, device_budget_bytes=150)
    assert tighter.victims(sessions, now=100) == [("t", "idle"), ("t", "a")]


def test_sessions_that_cannot_move_still_count_against_the_budget():
    policy = OffloadPolicy(idle_timeout_s=1000, device_budget_bytes=100)
    sessions = [_r("pinned", 1, nbytes=300, pinned=True), _r("a", 2), _r("b", 3)]
    assert policy.victims(sessions, now=4) == [("t", "a"), ("t", "b")]  # everything movable leaves; still over


def test_load_cost_mixes_each_measure_into_its_average():
    cost = RestoreCost(restore_s_per_block=1.0, prefill_s_per_token=1.0, alpha=0.5)
    cost.observe_restore(blocks=3, seconds=6.0)  # 2 s per block
    cost.observe_prefill(tokens=4, seconds=0.0)  # 0 s per token
    assert (cost.restore_s_per_block, cost.prefill_s_per_token) == (1.5, 0.5)
    cost.observe_restore(blocks=1, seconds=0.5)
    assert cost.restore_s_per_block == 1.0


def test_load_cost_ignores_empty_and_negative_measures():
    cost = RestoreCost(restore_s_per_block=1.0, prefill_s_per_token=2.0, alpha=0.5)
    cost.observe_restore(blocks=0, seconds=5.0)
    cost.observe_restore(blocks=2, seconds=-1.0)
    cost.observe_prefill(tokens=0, seconds=5.0)
    cost.observe_prefill(tokens=2, seconds=-1.0)
    assert (cost.restore_s_per_block, cost.prefill_s_per_token) == (1.0, 2.0)


def test_loading_pays_only_when_strictly_cheaper_than_prefill():
    cost = RestoreCost(restore_s_per_block=2.0, prefill_s_per_token=0.5, alpha=0.5)
    assert cost.restore_pays(blocks=1, tokens=5)  # 2 < 2.5
    assert not cost.restore_pays(blocks=1, tokens=4)  # 2 == 2: recompute
    assert not cost.restore_pays(blocks=3, tokens=8)  # 6 > 4
    assert cost.restore_pays(blocks=0, tokens=1)  # nothing to load
