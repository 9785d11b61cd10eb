"""Optional TLS on the gateway: a client trusting the certificate talks; a plaintext client cannot."""

import subprocess

import grpc
import pytest

from services.client import KvstashClient
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tls_stack(redis_server, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    svc = ServiceProcess(tmp, {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvtls",
        "KVSTASH_RAY__NUM_WORKERS": "1", "KVSTASH_GATEWAY__TLS_CERT_FILE": str(cert),
        "KVSTASH_GATEWAY__TLS_KEY_FILE": str(key),
    })
    svc.start()
    yield svc, cert
    svc.stop()


def test_tls_client_works_and_plaintext_is_refused(tls_stack):
    svc, cert = tls_stack
    with KvstashClient(svc.target, timeout=60, tls_ca_file=str(cert)) as c:
        out = c.generate("over tls", max_new_tokens=3)
        assert len(out.token_ids) == 3 and c.get_session(out.session_id).token_count > 3
    with KvstashClient(svc.target, timeout=10) as plain, pytest.raises(grpc.RpcError) as e:
        plain.generate("in the clear", max_new_tokens=1)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
