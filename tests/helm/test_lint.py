"""`helm lint --strict` passes for every shipped values profile and fails, with a message, on bad values."""

import pytest

from tests.helm.chart import CHART, helm, value_args


def lint(profile=None, sets=(), set_strings=()):
    args = value_args(profile, tuple(sets))
    for s in set_strings:
        args += ["--set-string", s]
    res = helm("lint", "--strict", str(CHART), *args)
    return res.returncode, res.stdout + res.stderr


def test_lint_strict_passes(profile):
    code, out = lint(profile)
    assert code == 0, out
    assert "0 chart(s) failed" in out


BAD = [
    # (--set, --set-string, words the error must contain)
    (["ray.worker.replicas=-1"], [], ["/ray/worker/replicas", "minimum"]),
    ([], ["gateway.replicas=three"], ["/gateway/replicas", "want integer"]),
    (["config.ray.num_workers=0"], [], ["/config/ray/num_workers", "minimum"]),
    (["config.session.idle_timeout=5"], [], ["/config/session", "idle_timeout"]),
    (["config.ray.address=ray://elsewhere:10001"], [], ["/config/ray", "address"]),
    (["redis.maxmemoryPolicy=evict-everything"], [], ["/redis/maxmemoryPolicy"]),
    (["redis.appendfsync=sometimes"], [], ["/redis/appendfsync"]),
    (["apiKeys.keys.k1=bad tenant!"], [], ["/apiKeys/keys/k1"]),
    ([], ["config.kv.codec_level=high"], ["/config/kv/codec_level", "want integer"]),
    # Cross-field checks (templates), which the schema cannot express.
    (["ray.worker.minReplicas=3"], [], ["INVALID VALUES", "minReplicas <= replicas <= maxReplicas"]),
    (["ray.worker.gpus=0"], [], ["INVALID VALUES", "ray.worker.gpus is 0"]),
    (["config.ray.num_workers=8"], [], ["INVALID VALUES", "needs more GPUs"]),
    (["redis.enabled=false"], [], ["INVALID VALUES", "redis.external.url"]),
    (["redis.external.url=redis://x:6379/0"], [], ["INVALID VALUES", "redis.enabled=false"]),
    (["redis.enabled=false", "redis.external.url=http://x:6379"], [], ["/redis/external/url"]),
    (["gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=5"], [], ["INVALID VALUES", "minReplicas (5) > maxReplicas (3)"]),
]


@pytest.mark.parametrize("sets,set_strings,words", BAD, ids=[" ".join(b[0] + b[1]) for b in BAD])
def test_bad_value_fails_lint_with_a_message(sets, set_strings, words):
    code, out = lint(sets=sets, set_strings=set_strings)
    assert code != 0, f"lint passed with {sets + set_strings}:\n{out}"
    for w in words:
        assert w in out, f"lint output lacks {w!r}:\n{out}"


def test_cross_field_check_also_stops_helm_template():
    res = helm("template", "demo", str(CHART), "--set", "ray.worker.minReplicas=3")
    assert res.returncode != 0
    assert "ray.worker: need minReplicas <= replicas <= maxReplicas, got 3 <= 1 <= 4" in res.stderr
