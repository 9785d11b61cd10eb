"""RedisTier on a real Redis Cluster (3 masters + 3 replicas): commit/read/delete/collect/stats work through
redis-py's RedisCluster, and no script ever crosses slots (CROSSSLOT would raise and fail the test)."""
from kvstore.tiers.redis_tier import RedisTier
from services.runtime.redis_url import redis_client
from tests.kvstore.tiers.test_redis_tier import _data, _m, _ref


def test_commit_read_delete_collect_on_a_cluster(redis_cluster):
    tier = RedisTier(redis_client(redis_cluster.url, 5.0), namespace="clt")
    refs = [_ref(1), _ref(2), _ref(3, public=True)]
    held = tier.commit_session(_m("s1", blocks=refs), [], _data(refs)).bytes
    assert tier.get_manifest("acme", "s1") == _m("s1", blocks=refs)
    assert tier.get_blocks("acme", refs) == [_data(refs)[r.key] for r in refs]
    assert tier.session_bytes("acme", "s1", refs) == held + sum(len(d) + 32 for d in _data(refs).values())
    assert tier.stats()["sessions"] == 1
    assert tier.delete_session("acme", "s1") is True
    assert tier.get_blocks("acme", refs[:2]) == [None, None]
    assert tier.collect() == {"fixed": 0, "deleted": 0}
    assert tier.stats() == {"bytes": 0, "sessions": 0, "blocks": 0}
