"""Rendered manifests are valid Kubernetes objects.

Built-in kinds: kubernetes-validate, strict (unknown fields fail), Kubernetes 1.30. The custom resources
(RayCluster, ServiceMonitor): trimmed CRD schemas in schemas/ (see schemas/README.md) with jsonschema, the
Ray pod templates as PodTemplates with kubernetes-validate, and their key fields asserted.
"""

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from tests.helm.chart import container, objects, one, render, selector_matches

K8S_VERSION = "1.30"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}
# Every optional part switched on, so that each template is validated at least once.
ALL_ON = ("gateway.autoscaling.enabled=true", "monitoring.serviceMonitor.enabled=true",
          "monitoring.dashboard.enabled=true", "apiKeys.existingSecret=", "apiKeys.keys.k1=tenant-a",
          "ray.autoscaling.enabled=true", "ray.upgradeStrategy=Recreate")


def crd_validator(doc):
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    return jsonschema.Draft202012Validator(schema)


def k8s_errors(doc) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}/{doc['metadata']['name']} at {list(e.path)}: {e.message}"]
    return []


def ray_pod_templates(rc):
    yield rc["spec"]["headGroupSpec"]["template"]
    for g in rc["spec"]["workerGroupSpecs"]:
        yield g["template"]


@pytest.mark.parametrize("sets", [(), ALL_ON], ids=["as-shipped", "all-on"])
def test_builtin_objects_pass_kubernetes_validate_strict(profile, sets):
    errors = []
    for doc in render(profile, sets):
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        errors += k8s_errors(doc)  # an unknown kind raises SchemaNotFoundError: no silent pass
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("sets", [(), ALL_ON], ids=["as-shipped", "all-on"])
def test_custom_resources_match_their_crd_schemas(profile, sets):
    docs = render(profile, sets)
    customs = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    assert any(d["kind"] == "RayCluster" for d in customs)
    errors = []
    for doc in customs:
        errors += [f"{doc['kind']} at {list(e.path)}: {e.message}" for e in crd_validator(doc).iter_errors(doc)]
        if doc["kind"] == "RayCluster":
            for tpl in ray_pod_templates(doc):
                errors += k8s_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"},
                                      "template": tpl})
    assert not errors, "\n".join(errors)


def test_trimmed_crd_schemas_are_not_vacuous():
    rc = one(render("gpu"), "RayCluster")
    validator = crd_validator(rc)
    jsonschema.Draft202012Validator.check_schema(validator.schema)
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpec"] = bad["spec"].pop("workerGroupSpecs")  # misspelt
    assert not validator.is_valid(bad)
    bad = copy.deepcopy(rc)
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert not validator.is_valid(bad)
    sm = one(render("gpu"), "ServiceMonitor")
    bad = copy.deepcopy(sm)
    bad["spec"]["endpoints"][0]["intervall"] = "5s"
    assert not crd_validator(sm).is_valid(bad)


def test_raycluster_gpu_worker_group():
    rc = one(render("default"), "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["enableInTreeAutoscaling"] is False
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "worker actors must not land on the head"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= head_ports
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("gpu", 1, 1, 4)
    spec = group["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["containers"][0]["image"].endswith(":0.1.0-gpu")


def test_raycluster_cpu_only_profile_has_no_gpu():
    rc = one(render("cpu"), "RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(spec)
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert spec["containers"][0]["image"].endswith(":0.1.0-cpu")


def test_ray_autoscaling_comes_from_values():
    rc = one(render("gpu", ("ray.worker.maxReplicas=6", "ray.autoscaling.idleTimeoutSeconds=90")), "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 90
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 6)
    # KubeRay runs the autoscaler as a sidecar of the head pod: it needs the service account token.
    assert rc["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert group["template"]["spec"]["automountServiceAccountToken"] is False
    off = one(render("default"), "RayCluster")["spec"]
    assert "autoscalerOptions" not in off
    assert off["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_servicemonitor_scrapes_the_gateway_metrics_port():
    docs = render("gpu")
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = next(s for s in objects(docs, "Service") if selector_matches(sm["spec"]["selector"], s["metadata"]["labels"]))
    assert svc["metadata"]["name"] == "demo-kvstash-gateway"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    port = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
    gateway = container(one(docs, "Deployment"), "gateway")
    assert port["port"] == next(p["containerPort"] for p in gateway["ports"] if p["name"] == "metrics") == 9464
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["kvstash"]


def test_monitoring_is_off_by_default():
    docs = render("default")
    assert not objects(docs, "ServiceMonitor")
    assert not [d for d in objects(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
