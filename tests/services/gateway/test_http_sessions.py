"""The HTTP API's per-request session lifecycle and its quotas, through a real stack (real SmolLM2, real
redis-server, real Ray, real sockets) and the official `openai` client."""

import time

import openai
import pytest

from services.client import KvstashClient
from tests.services.stack import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.model]

KEY_A, KEY_C = "sk-life-alpha-7c1e9a3b5d2f4a6c8e0b", "sk-life-gamma-4d8f2b6a0c3e5a7c9e1b"
MODEL = "kvstash"
KEPT, MAX_SESSIONS, TOKENS_PER_MINUTE = 2, 4, 1500


@pytest.fixture(scope="module")
def life_stack(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http_life")
    keys = tmp / "keys.toml"
    keys.write_text(f'[keys]\n"{KEY_A}" = "alpha"\n"{KEY_C}" = "gamma"\n')
    svc = ServiceProcess(tmp, {
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvhttplife",
        "KVSTASH_RAY__NUM_WORKERS": "1", "KVSTASH_GATEWAY__API_KEYS_FILE": str(keys),
        "KVSTASH_HTTP__CONVERSATIONS_PER_TENANT": str(KEPT), "KVSTASH_QUOTA__MAX_SESSIONS": str(MAX_SESSIONS),
        "KVSTASH_QUOTA__MAX_TOKENS_PER_MINUTE": str(TOKENS_PER_MINUTE),
    })
    svc.start()
    yield svc
    svc.stop()


def _sessions(svc, key) -> int:
    with KvstashClient(svc.target, api_key=key, timeout=60) as g:
        return len(list(g.list_sessions()))


def test_stateless_requests_do_not_accumulate_sessions(life_stack):
    """Twice the tenant's session quota of one-shot requests all succeed: sessions beyond the tenant's
    `http.conversations_per_tenant` most recent conversations are deleted."""
    c = openai.OpenAI(base_url=life_stack.http_url + "/v1", api_key=KEY_A, timeout=300, max_retries=0)
    for i in range(2 * MAX_SESSIONS):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}],
                                  max_tokens=2, temperature=0)
    deadline = time.monotonic() + 60
    while (n := _sessions(life_stack, KEY_A)) > KEPT:  # the last deletions run after their response
        assert time.monotonic() < deadline, f"tenant holds {n} sessions, over {KEPT}"
        time.sleep(0.5)


def test_rate_limit_is_a_live_429_with_retry_after(life_stack):
    c = openai.OpenAI(base_url=life_stack.http_url + "/v1", api_key=KEY_C, timeout=300, max_retries=0)
    long = " ".join(f"word{i}" for i in range(150))
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(TOKENS_PER_MINUTE // 300 + 2):  # each call uses over 300 tokens
            c.completions.create(model=MODEL, prompt=long, max_tokens=1)
    assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "resource_exhausted" and "max_tokens_per_minute" in e.value.body["message"]
    ok = openai.OpenAI(base_url=life_stack.http_url + "/v1", api_key=KEY_A, timeout=300, max_retries=0)
    assert ok.models.list().data[0].id == MODEL  # the server keeps serving
