import pytest

from tests.services.stack import ServiceProcess, make_tiny_model

# Small window and groups so that short test sessions already seal quantized key groups.
TINY_SPEC = "int4:k8v4:g32:gv16:r32"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_stack(redis_server, tiny_model_dir, tmp_path_factory):
    """kvstash up (real Ray with two worker actors, real gRPC) on the tiny model, with a real redis-server."""
    svc = ServiceProcess(tmp_path_factory.mktemp("stack"), {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir),
        "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url,
        "KVSTASH_REDIS__NAMESPACE": "kvtest",
        "KVSTASH_RAY__NUM_WORKERS": "2",
        "KVSTASH_SESSION__IDLE_TIMEOUT_S": "8",
        "KVSTASH_SESSION__IDLE_CHECK_INTERVAL_S": "0.5",
        "KVSTASH_GATEWAY__METRICS_POLL_INTERVAL_S": "0.5",
        "KVSTASH_KV__QUALITY_SAMPLE_RATE": "1",
        "KVSTASH_SESSION__MAX_REQUESTS_PER_WORKER": "3",
        "KVSTASH_TIERS__HOST_BYTES": "0",  # resumes read Redis, so the tests that damage stored blocks see it
    })
    svc.start()
    yield svc
    svc.stop()
