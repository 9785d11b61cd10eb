"""`kvstash migrate-layout` against a real redis-server: sessions of the pre-issue-17 layout come out in the new
layout, byte for byte, and the command reports what it moved."""

import json

import redis

from kvstore.tiers.redis_tier import RedisTier
from services.cli.main import main
from tests.kvstore.tiers.test_legacy_layout import _legacy_keys, _legacy_scene
from tests.kvstore.tiers.test_redis_tier import _data


def test_migrate_layout_command_moves_every_legacy_session(redis_server, capsys):
    tier = RedisTier(redis.Redis.from_url(redis_server.url), namespace="clim")
    pub, live = _legacy_scene(tier)
    assert main(["migrate-layout", "--redis-url", redis_server.url, "--namespace", "clim"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["sessions"], report["public_prefixes"], report["corrupt"]) == (len(live), 1, 0)
    for (tenant, sid), m in live.items():
        assert tier.get_manifest(tenant, sid) == m
        assert tier.get_blocks(tenant, m.blocks) == [_data(m.blocks)[r.key] for r in m.blocks]
    assert _legacy_keys(tier.client, "clim") == []
    assert main(["migrate-layout", "--redis-url", redis_server.url, "--namespace", "clim"]) == 0  # done already
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sessions"] == 0
