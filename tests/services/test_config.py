from pathlib import Path

import pytest

from services.config import KvstashConfig, reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_are_valid():
    cfg = KvstashConfig()
    cfg.validate()
    assert cfg.quant.spec()


def test_toml_then_env_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[kv]\nspec = "int8"\n[ray]\nnum_workers = 3\n')
    cfg = KvstashConfig.load(f, env={"KVSTASH_RAY__NUM_WORKERS": "2", "KVSTASH_SESSION__IDLE_TIMEOUT_S": "1.5"})
    assert cfg.kv.spec == "int8" and cfg.ray.num_workers == 2 and cfg.session.idle_timeout_s == 1.5


@pytest.mark.parametrize("d,needle", [
    ({"nope": {}}, "unknown config section"),
    ({"ray": {"nope": 1}}, "unknown config key ray.nope"),
    ({"ray": {"num_workers": "many"}}, "not a valid int"),
    ({"kv": {"spec": "int7"}}, "unknown KV scheme"),
    ({"ray": {"num_workers": 0}}, "num_workers"),
    ({"kv": {"spec": "int:k4v3:g128:gv64:r64:w8:cw43"}}, "cw43 belong in tiers.cold_spec"),
    ({"kv": {"spec": "int:k4v3:g128:gv64:r64:w8:qk"}}, "qk belong in tiers.cold_spec"),
    ({"tiers": {"cold_spec": "int:k3v2:g128:gv64:s1:cw91"}}, "unknown KV spec knob"),
])
def test_bad_config_is_rejected_clearly(d, needle):
    with pytest.raises(ValueError, match=needle):
        KvstashConfig.from_dict(d)


def test_readme_config_reference_is_current():
    assert reference_markdown() in README.read_text(), "README config reference is stale: paste `kvstash config`"


def test_default_block_size_follows_key_groups_and_prefill_chunk():
    assert KvstashConfig().block_tokens == 128
    g32 = {"spec": "int4:g32:gv64:r64:w8"}  # the default's keys come in groups of 128 tokens: blocks of 128 at least
    assert KvstashConfig.from_dict({"kv": g32, "prefix": {"prefill_chunk": 64}}).block_tokens == 64
    assert KvstashConfig.from_dict({"tiers": {"cold_spec": "int:k3v2:g128:gv64:s1:hadv"}}).block_tokens == 128
    assert KvstashConfig.from_dict({"kv": {"spec": "int4:g48:r128"}, "prefix": {"prefill_chunk": 576}}).block_tokens == 144
    assert KvstashConfig.from_dict({"kv": g32, "prefix": {"block_tokens": 64}}).block_tokens == 64
    with pytest.raises(ValueError, match="multiple of the key group"):
        KvstashConfig.from_dict({"prefix": {"block_tokens": 64}})
