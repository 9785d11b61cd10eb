"""Every service error maps to an OpenAI error object with its HTTP status (and `retry-after` for quotas)."""

import json

from services.errors import _BY_CODE, ResourceExhausted
from services.gateway.http_api import STATUS, _kv_error


def test_every_service_error_code_has_an_http_status():
    assert set(_BY_CODE) <= set(STATUS)


def test_quota_errors_are_429_with_retry_after_in_whole_seconds():
    resp = _kv_error(ResourceExhausted("tenant over quota.max_tokens_per_minute=10", retry_after_s=1.2))
    assert resp.status == 429 and resp.headers["retry-after"] == "2"
    body = json.loads(resp.body)
    assert body == {"error": {"message": "tenant over quota.max_tokens_per_minute=10", "type": "rate_limit_error",
                              "param": None, "code": "resource_exhausted"}}
