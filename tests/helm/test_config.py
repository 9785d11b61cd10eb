"""The config the chart hands the gateway is one the service accepts: the rendered config.toml, the
KVSTASH_* environment, the API keys file, and values.schema.json's `config` section, all checked
against services/config.py itself."""

import dataclasses
import json
import re
import tomllib
import typing

import pytest

from services.config import KvstashConfig
from services.gateway.auth import Authenticator
from tests.helm.chart import CHART, container, one, render

# Service config keys the chart sets itself, and those that only apply to `kvstash up` spawning a local
# redis-server / Ray instance. Every other service key must be settable through values `config`.
CHART_OWNED = {("ray", "address"), ("redis", "url"), ("gateway", "host"), ("gateway", "port"),
               ("gateway", "metrics_port"), ("gateway", "api_keys_file"), ("http", "port")}
LOCAL_ONLY = {("redis", "data_dir"), ("ray", "local_num_cpus")}
SECRETS = {("prefix", "salt_key")}  # set from a Secret (gateway.extraEnv), never rendered into the config
JSON_TYPES = {int: {"integer"}, float: {"number", "integer"}, str: {"string"}, bool: {"boolean"}}
ENV_RE = re.compile(r"^KVSTASH_([A-Z0-9_]+?)__([A-Z0-9_]+)$")


def service_fields() -> dict[tuple[str, str], type]:
    out = {}
    for sec in dataclasses.fields(KvstashConfig):
        cls = typing.get_type_hints(KvstashConfig)[sec.name]
        for name, typ in typing.get_type_hints(cls).items():
            out[(sec.name, name)] = typ
    return out


def config_toml(docs) -> dict:
    return tomllib.loads(one(docs, "ConfigMap", "demo-kvstash-config")["data"]["config.toml"])


def gateway_env(docs) -> list[dict]:
    return container(one(docs, "Deployment"), "gateway")["env"]


def test_rendered_config_is_accepted_by_the_service(profile):
    parsed = config_toml(render(profile))
    cfg = KvstashConfig.from_dict(parsed)  # raises on an unknown section or key, or a bad kv.spec
    fields = service_fields()
    for section, values in parsed.items():
        for key, value in values.items():
            typ = fields[(section, key)]
            ok = isinstance(value, typ) or (typ is float and type(value) is int)
            assert ok, f"{section}.{key} = {value!r} is not a {typ.__name__}"
    assert cfg.gateway.host == "0.0.0.0"
    assert "url" not in parsed.get("redis", {}), "the Redis URL carries the password: env from a Secret only"


def test_chart_owned_keys_point_at_the_rendered_objects(profile):
    docs = render(profile)
    parsed = config_toml(docs)
    rc = one(docs, "RayCluster")
    assert parsed["ray"]["address"] == f"ray://{rc['metadata']['name']}-head-svc:10001"
    ports = {p["name"]: p["containerPort"] for p in container(one(docs, "Deployment"), "gateway")["ports"]}
    assert (parsed["gateway"]["port"], parsed["gateway"]["metrics_port"], parsed["http"]["port"]) == (
        ports["grpc"], ports["metrics"], ports["http"])


def test_values_overrides_reach_the_config():
    parsed = config_toml(render("default", ("config.kv.spec=int8:r64", "config.session.idle_timeout_s=42")))
    assert parsed["kv"]["spec"] == "int8:r64"
    assert parsed["session"]["idle_timeout_s"] == 42  # an int64 from --set


def test_env_names_map_to_service_fields(profile):
    fields = service_fields()
    for env in gateway_env(render(profile)):
        m = ENV_RE.match(env["name"])
        if env["name"].startswith("KVSTASH_") and env["name"] != "KVSTASH_CONFIG":
            assert m, f"{env['name']} is not KVSTASH_<SECTION>__<FIELD>"
            assert (m[1].lower(), m[2].lower()) in fields, f"{env['name']} names no config field"


def test_gateway_config_as_the_service_loads_it(tmp_path, profile):
    """KvstashConfig.load with the mounted file and the pod env (Secrets and $(VAR) expansion simulated)."""
    docs = render(profile)
    dep = one(docs, "Deployment")
    env, resolved = gateway_env(docs), {}
    for e in env:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            resolved[e["name"]] = f"<{ref['name']}/{ref['key']}>"
        else:
            for var in re.findall(r"\$\((\w+)\)", e["value"]):
                assert var in resolved, f"{e['name']} uses $({var}) before it is defined"
            resolved[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: resolved[m[1]], e["value"])
    mounts = {m["mountPath"]: m for m in container(dep, "gateway")["volumeMounts"]}
    assert mounts[resolved["KVSTASH_CONFIG"]]["subPath"] == "config.toml"
    (tmp_path / "config.toml").write_text(one(docs, "ConfigMap", "demo-kvstash-config")["data"]["config.toml"])
    resolved["KVSTASH_CONFIG"] = str(tmp_path / "config.toml")
    cfg = KvstashConfig.load(env=resolved)
    if profile.startswith("external-redis"):
        assert cfg.redis.url == "<kvstash-redis-url/redis-url>"
    else:
        assert cfg.redis.url == "redis://:<demo-kvstash-redis/redis-password>@demo-kvstash-redis:6379/0"
        assert one(docs, "Service", "demo-kvstash-redis")["spec"]["ports"][0]["port"] == 6379


def test_values_schema_config_matches_the_service_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]
    fields = service_fields()
    in_schema = {(sec, key) for sec, s in schema.items() for key in s["properties"]}
    assert not in_schema - set(fields), f"values config keys the service does not have: {in_schema - set(fields)}"
    missing = set(fields) - in_schema - CHART_OWNED - LOCAL_ONLY - SECRETS
    assert not missing, f"service config keys the chart does not expose (add them to values and the schema): {missing}"
    assert not in_schema & (CHART_OWNED | SECRETS)
    for sec, key in in_schema:
        assert schema[sec]["properties"][key]["type"] in JSON_TYPES[fields[(sec, key)]], f"{sec}.{key} type"
    values_config = __import__("yaml").safe_load((CHART / "values.yaml").read_text())["config"]
    assert {(s, k) for s, v in values_config.items() for k in v} == in_schema


def test_api_keys_secret_is_a_key_file_the_gateway_reads(tmp_path):
    docs = render("default", ("apiKeys.keys.sk-alpha=tenant-a", "apiKeys.keys.sk-beta=tenant.b"))
    secret = one(docs, "Secret", "demo-kvstash-api-keys")
    path = tmp_path / "keys.toml"
    path.write_text(secret["stringData"]["keys.toml"])
    auth = Authenticator.from_file(str(path))
    assert auth.tenant([("authorization", "Bearer sk-alpha")]) == "tenant-a"
    assert auth.tenant([("authorization", "Bearer sk-beta")]) == "tenant.b"
    keys_file = config_toml(docs)["gateway"]["api_keys_file"]
    mount = next(m for m in container(one(docs, "Deployment"), "gateway")["volumeMounts"] if m["name"] == "api-keys")
    assert keys_file == f"{mount['mountPath']}/keys.toml"
    volume = next(v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


@pytest.mark.parametrize("profile_name,expect", [("default", False), ("gpu", True)])
def test_api_keys_file_only_when_keys_are_configured(profile_name, expect):
    parsed = config_toml(render(profile_name))
    assert ("api_keys_file" in parsed["gateway"]) is expect
    if expect:  # values-gpu.yaml uses an existing Secret
        assert parsed["gateway"]["api_keys_file"] == "/etc/kvstash/api-keys/keys.toml"
