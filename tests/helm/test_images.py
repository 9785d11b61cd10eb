"""Container images and the compose stack, linted as text (Docker does not run here): pinned base images,
a non-root USER, versions that agree with pyproject.toml and the chart, and a compose file whose
settings map to real config fields."""

import re
import tomllib

import pytest
import yaml

from services.config import KvstashConfig
from tests.helm.chart import REPO, values_yaml

DOCKER = REPO / "deploy" / "docker"
ENV_RE = re.compile(r"^KVSTASH_([A-Z0-9_]+?)__([A-Z0-9_]+)$")


def pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)$", d).groups() for d in deps if "==" in d)


def instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def base_images(path) -> list[str]:
    args, images = {}, []
    for ins, rest in instructions(path):
        if ins.upper() == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
        elif ins.upper() == "FROM":
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], rest.split()[0]))
    return images


def assert_pinned(image: str):
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image} has no tag"
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image} is not pinned to a version"


@pytest.mark.parametrize("dockerfile", ["gateway.Dockerfile", "ray-worker.Dockerfile"])
def test_dockerfile_pins_its_base_and_runs_as_non_root(dockerfile):
    path = DOCKER / dockerfile
    for image in base_images(path):
        assert_pinned(image)
    users = [rest for ins, rest in instructions(path) if ins.upper() == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0"), f"runs as {users[-1]}"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "numeric USER, so that runAsNonRoot can check it"


def test_gateway_image_matches_the_ray_python_and_the_project_pins():
    (base,) = base_images(DOCKER / "gateway.Dockerfile")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    text = (DOCKER / "gateway.Dockerfile").read_text()
    assert "torch" not in "".join(rest for _, rest in instructions(DOCKER / "gateway.Dockerfile"))
    assert "pip install -r gateway-requirements.txt" in text and "pip install --no-deps ." in text
    uid = [rest for ins, rest in instructions(DOCKER / "gateway.Dockerfile") if ins == "USER"][-1].split(":")[0]
    assert f"runAsUser: {uid}" in (REPO / "helm/kvstash/templates/gateway-deployment.yaml").read_text()


def gateway_requirements() -> dict[str, str]:
    """name -> version spec of deploy/docker/gateway-requirements.txt (extras dropped)."""
    lines = [line.split("#")[0].strip() for line in (DOCKER / "gateway-requirements.txt").read_text().splitlines()]
    return dict(re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?(\S+)$", line).groups() for line in lines if line)


def test_gateway_requirements_are_the_project_pins_without_the_model_stack():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = dict(re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?(\S+)$", d).groups() for d in deps)
    reqs = gateway_requirements()
    for name, spec in reqs.items():
        assert specs.get(name) == spec, f"gateway-requirements.txt: {name}{spec}, pyproject.toml: {specs.get(name)}"
    assert not {"torch", "transformers", "numba", "numpy", "zstandard", "accelerate", "gguf"} & set(reqs)
    assert "!deploy/docker/gateway-requirements.txt" in (DOCKER / "gateway.Dockerfile.dockerignore").read_text()


def test_gateway_requirements_cover_what_the_gateway_imports():
    """Every project dependency the gateway's process imports (`kvstash up`: CLI, stack, gateway, the actor
    class it creates workers from) is in the image's requirements."""
    import importlib.metadata as md

    from tests.services.gateway.test_imports import imported

    modules = imported("services.cli.main", "services.runtime.stack", "services.gateway.server",
                       "services.worker.actor")["modules"]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    project = {norm(re.match(r"^[A-Za-z0-9_.-]+", d)[0]) for d in deps}
    by_module = md.packages_distributions()
    used = {norm(d) for m in modules for d in by_module.get(m.split(".")[0], ())} & project
    assert used and used <= {norm(n) for n in gateway_requirements()}, used - {norm(n) for n in gateway_requirements()}


def test_ray_image_is_the_official_ray_at_the_pinned_version():
    (base,) = base_images(DOCKER / "ray-worker.Dockerfile")
    ray = pins()["ray"]
    assert base == f"rayproject/ray:{ray}-py311-gpu"
    assert values_yaml()["ray"]["version"] == ray, "the chart's rayVersion must be the pinned Ray"
    text = (DOCKER / "ray-worker.Dockerfile").read_text()
    assert f"rayproject/ray:{ray}-py311-cpu" in text, "the documented CPU variant"
    assert f"torch=={pins()['torch']}" in text and "model pull" in text
    assert "KVSTASH_MODEL__CACHE_DIR=" + values_yaml()["config"]["model"]["cache_dir"] in text


def compose() -> dict:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def test_compose_has_the_four_services_with_pinned_images():
    services = compose()["services"]
    assert set(services) == {"redis", "ray-head", "ray-worker", "gateway"}
    for name, svc in services.items():
        assert_pinned(svc["image"])
        if "build" in svc:
            assert (REPO / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
            for arg in (svc["build"].get("args") or {}).values():
                if arg.startswith("rayproject/"):
                    assert_pinned(arg)


def test_compose_redis_uses_aof_with_a_password():
    cmd = compose()["services"]["redis"]["command"]
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "volatile-lru"  # only KV blocks carry an expiry: manifests stay
    assert int(compose()["services"]["gateway"]["environment"]["KVSTASH_REDIS__KV_TTL_S"]) > 0
    assert flags["--requirepass"].startswith("${REDIS_PASSWORD:?")
    assert any(v.endswith(":/data") for v in compose()["services"]["redis"]["volumes"])


def test_compose_gateway_env_is_real_config_pointing_at_the_other_services():
    env = compose()["services"]["gateway"]["environment"]
    fields = {(s, k) for s, v in KvstashConfig().to_dict().items() for k in v}
    for name in env:
        m = ENV_RE.match(name)
        assert m and (m[1].lower(), m[2].lower()) in fields, f"{name} names no config field"
    assert env["KVSTASH_RAY__ADDRESS"] == "ray://ray-head:10001"
    assert "--ray-client-server-port=10001" in compose()["services"]["ray-head"]["command"]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:6379/0", env["KVSTASH_REDIS__URL"])
    assert env["KVSTASH_GATEWAY__HOST"] == "0.0.0.0"
    env = {k: v.replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", "pw") for k, v in env.items()}
    cfg = KvstashConfig.load(env=env)  # types convert, values validate
    assert cfg.redis.url == "redis://:pw@redis:6379/0" and cfg.ray.num_gpus_per_worker == 0
