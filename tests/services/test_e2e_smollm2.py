"""End to end on the real pretrained SmolLM2-135M-Instruct with the default KV config."""

import pytest

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.client import KvstashClient
from tests.services.stack import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]


@pytest.fixture(scope="module")
def smol_stack(redis_server, tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("smol"), {
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvsmol",
        "KVSTASH_KV__SPEC": "int4:k8v4:g32:gv32:r32",  # seal early: the quantized path is exercised
    })
    svc.start()
    yield svc
    svc.stop()


def test_smollm2_answers_and_resumes_exactly(smol_stack):
    n, k = 48, 15
    with KvstashClient(smol_stack.target, timeout=300) as c:
        answer = c.generate(messages=QUESTION, max_new_tokens=30)
        assert "Paris" in answer.text  # the quantized cache keeps the model useful
        ref = c.generate(messages=STORY, max_new_tokens=n)
        assert len(ref.token_ids) == n
        first = c.generate(messages=STORY, max_new_tokens=k)
        assert first.token_ids == ref.token_ids[:k]
        info = c.evict_session(first.session_id)
        assert info.state == pb.SESSION_STATE_COLD
        rest = c.resume(first.session_id, max_new_tokens=n - k)
        assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED
        assert first.token_ids + rest.token_ids == ref.token_ids
        c.evict_session(answer.session_id)
        follow = c.resume(answer.session_id, messages=[{"role": "user", "content": "And of Germany?"}],
                          max_new_tokens=30)
        assert follow.usage.kv_source == pb.KV_SOURCE_RESTORED
        assert "Berlin" in follow.text
