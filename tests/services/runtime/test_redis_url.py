"""`redis.url` parsing: the cluster form lists startup nodes and AUTH; a malformed URL is refused clearly."""
import pytest
import redis
from redis.cluster import RedisCluster

from services.runtime.redis_url import ClusterUrl, redis_client, redis_setting


def test_cluster_url_nodes_auth_and_tls():
    cu = ClusterUrl.parse("rediss+cluster://alice:s%40cret@10.0.0.1:7000,10.0.0.2:7001/0")
    assert cu.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (cu.username, cu.password, cu.tls) == ("alice", "s@cret", True)
    plain = ClusterUrl.parse("redis+cluster://:pw@h:1")
    assert (plain.username, plain.password, plain.tls, plain.nodes) == (None, "pw", False, (("h", 1),))


@pytest.mark.parametrize("url", ["redis+cluster://h", "redis+cluster://h:0", "redis+cluster://:7000",
                                 "redis+cluster://h:1/3", "redis://h:1"])
def test_malformed_cluster_url_refused(url):
    with pytest.raises(ValueError):
        ClusterUrl.parse(url)


def test_single_node_url_stays_a_plain_client(redis_server):
    assert type(redis_client(redis_server.url, 2.0)) is redis.Redis
    assert not isinstance(redis_client("redis://127.0.0.1:1/0", 2.0), RedisCluster)


def test_config_get_reads_the_same_on_one_node_and_a_cluster(redis_server, redis_cluster):
    for url in (redis_server.url, redis_cluster.url):
        reply = redis_client(url, 5.0).config_get("maxmemory-policy")
        assert redis_setting(reply, "maxmemory-policy") == "noeviction"
