"""Service configuration: dataclasses are the single source of defaults and documentation.

Load order (later wins): defaults here → a TOML file (`--config` / `KVSTASH_CONFIG`) → environment
variables `KVSTASH_<SECTION>__<FIELD>` (e.g. `KVSTASH_REDIS__URL`). `reference_markdown()` renders
the README's config reference from these same dataclasses, so the docs cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from kvstore.config import QuantConfig


def _f(default, doc: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # model.dtype's values (services/worker/model_runner.py)


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Model: the built-in default's name, an HF model folder, or a hub id.")
    dtype: str = _f("auto", "Weights and activations dtype: auto, float32, bfloat16 or float16. auto is bfloat16 "
                            "where products run natively in it (a CPU with AVX512-BF16 or AMX; a CUDA device that "
                            "supports it), else float32: on this 2-core AMX machine bf16 serves ~1.35x fp32's "
                            "tokens/s at 16 sessions for +0.003 PPL (docs/BENCHMARKS.md, \"Default dtype\").")
    device: str = _f("auto", "Device: auto (cuda when present, else cpu), cpu, cuda, cuda:N.")
    prepack_weights: bool = _f(True, "bfloat16 on a CPU with native bf16 products: run linear layers on weights "
                                     "prepacked once for oneDNN instead of repacked per call (the engine: "
                                     "~1.3x the one-session tokens/s, ~1.2x at 16 sessions; over gRPC ~1.2x "
                                     "and ~1.03x; services/worker/prepacked_linear.py). Elsewhere ignored.")
    cache_dir: str = _f("", "Where pulled models are kept; empty means $KVSTASH_HOME/models (~/.kvstash/models).")


# The default device spec (issue 16): INT4 keys in groups of 128 tokens, INT3 values in groups of 64 channels
# after a Hadamard rotation of head_dim (attention runs in the rotated basis, so nothing is rotated back on
# read), a 64-token window held as INT8 codes, the first 4 tokens (attention sinks) kept exact. docs/BENCHMARKS.md
# "Whole-session memory" measures it.
DEFAULT_KV_SPEC = "int:k4v3:g128:gv64:r64:w8:s4:hadv:hadattn"


@dataclass
class KVConfig:
    spec: str = _f(DEFAULT_KV_SPEC, "On-device KV quantization spec (grammar in kvstore/config.py), e.g. int4, int8:r64, fp.")
    codec_level: int = _f(3, "zstandard level of a stored session's tail (its full-precision window); blocks use "
                             "the rANS block coder.")
    quality_sample_rate: float = _f(
        0.01, "Fraction of decode steps on which the worker probes quantization error per layer (0 disables)."
    )


@dataclass
class PrefixConfig:
    enabled: bool = _f(True, "Share KV of common prompt prefixes: dedup stored blocks across sessions and adopt a "
                             "stored prefix instead of prefilling it (tenant-private unless marked public).")
    block_tokens: int = _f(0, "Tokens per stored KV block, a multiple of the key group; 0 means the smallest multiple "
                              "of the key group (and the cold key group) >= 128, or >= prefill_chunk when that is "
                              "smaller (128 codes in fewer bits and decodes faster than 64; see docs/BENCHMARKS.md).")
    prefill_chunk: int = _f(512, "Prefills run in passes ending at multiples of this many tokens (a multiple of "
                                 "block_tokens); the complete passes from position 0 are what sessions share.")
    trie_bytes: int = _f(256 << 20, "Host bytes of hot prefix blocks each worker keeps (the prefix trie); 0 disables it.")
    salt_key: str = _f("", "Secret mixed into every tenant's prefix salt (set it from a secret; empty is allowed).")


@dataclass
class TiersConfig:
    device_bytes: int = _f(0, "KV bytes a worker may hold on its device; beyond it least-recently-used idle "
                              "sessions are offloaded. 0 means no budget (only the idle timeout).")
    host_bytes: int = _f(512 << 20, "Bytes of encoded KV blocks a worker keeps in host memory (warm tier), "
                                    "so a resume on the same worker skips Redis; 0 disables it.")
    codec_threads: int = _f(0, "Threads that encode and decode a session's blocks in parallel; 0 means one per core.")
    collect_interval_s: float = _f(3600.0, "How often a worker repairs block reference counts and removes "
                                           "unreferenced blocks in Redis (0 disables; one worker suffices).")
    collect_grace_s: float = _f(600.0, "The sweep leaves alone a block referenced less than this before it "
                                       "began (a writer may be mid-commit; a commit must finish within it).")
    journal: bool = _f(True, "Keep a local append-only journal of every session history a worker writes, so "
                             "histories survive Redis losing data (FLUSHALL, a lost volume, evicted manifests).")
    journal_dir: str = _f("", "Journal directory, shared by the workers of a host (or a shared volume); empty means "
                              "$KVSTASH_HOME/journal.")
    cold_spec: str = _f("", "Opt-in lossy cold mode: a spec (grammar in kvstore/quant/cold.py), e.g. "
                            "int:k3v2:g128:gv64:s1:hadv:clipv:qk:cw43, that an offloaded session's own blocks are "
                            "re-quantized to (its `qk` weights key channels by the model's query energy, its `cw` "
                            "keeps the stored INT8 window at 4 bits for keys, 3 for values; "
                            "docs/BENCHMARKS.md gives bits and quality per spec). A resume is exact with respect "
                            "to the decoded cache, not the original. Empty: lossless.")


@dataclass
class SessionConfig:
    idle_timeout_s: float = _f(300.0, "Offload a session's KV to Redis after this many seconds without a call.")
    idle_check_interval_s: float = _f(5.0, "How often workers look for idle sessions.")
    default_max_new_tokens: int = _f(128, "max_new_tokens when a request leaves it 0.")
    max_new_tokens_limit: int = _f(4096, "Largest max_new_tokens a request may ask for.")
    max_prompt_tokens: int = _f(8192, "Largest number of new input tokens in one call.")
    max_session_tokens: int = _f(32768, "Largest token history of one session.")
    max_requests_per_worker: int = _f(
        64, "Generate/Resume calls a worker runs at once; more get RESOURCE_EXHAUSTED with a retry-after-ms hint.")


def _row_counts(key: str, value: str) -> list[int]:
    """A comma-separated list of row counts, sorted, without repeats; ValueError naming `key` if it does not parse."""
    try:
        return sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"{key}={value!r} must be comma-separated integers") from None


@dataclass
class BatchConfig:
    buckets: str = _f("1,2,4,8,16,32", "Row counts a batched decode pass may have (comma-separated): the sessions "
                      "ready for a decode step run in one pass padded to the smallest bucket that holds them. "
                      "One bucket (e.g. \"16\") makes greedy outputs independent of other traffic; \"1\" "
                      "decodes each session alone (no batching).")
    prefill_rows: str = _f("128,256,512", "Row counts a packed prefill pass may have (comma-separated; empty: "
                           "off). Prompts whose last chunk waits at the same time run side by side in one pass, "
                           "padded to the smallest of these that holds them (a lone prompt runs alone). Off when "
                           "`buckets` is one size: a greedy output then depends on no other traffic.")
    prefill_tokens_per_step: int = _f(512, "Prefill tokens a worker runs between two batched decode passes (at "
                                      "least one prefill pass always runs): higher favours time to first token, "
                                      "lower the running sessions' per-token latency.")
    tune_gc: bool = _f(True, "Tune Python's cyclic garbage collector for serving once a worker has started: its "
                       "start-up objects (the model, libraries) frozen out of the collector's walks (gc.freeze, as "
                       "vLLM, SGLang and Ray Serve do) and young collections every 50,000 allocations instead of "
                       "700, so collections stop pausing decode passes.")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The buckets, sorted; ValueError when they do not parse or are out of range."""
        sizes = _row_counts("batch.buckets", self.buckets)
        if not sizes or sizes[0] < 1 or sizes[-1] > 256:
            raise ValueError(f"batch.buckets={self.buckets!r} must list row counts in [1, 256]")
        return tuple(sizes)

    @property
    def prefill_sizes(self) -> tuple[int, ...]:
        """The packed prefill sizes, sorted (empty: off, and when `buckets` is one size); ValueError when they
        do not parse or are not multiples of 16 in [16, 4096]."""
        sizes = _row_counts("batch.prefill_rows", self.prefill_rows)
        if any(s < 16 or s > 4096 or s % 16 for s in sizes):
            raise ValueError(f"batch.prefill_rows={self.prefill_rows!r} must list multiples of 16 in [16, 4096]")
        return tuple(sizes) if len(self.sizes) > 1 else ()


@dataclass
class RedisConfig:
    url: str = _f("", "Redis URL: redis://[:password@]host:port/db, or rediss:// for TLS (AUTH via the password); "
                      "a Redis Cluster: redis+cluster://[user:password@]host:port[,host:port...] (rediss+cluster:// "
                      "for TLS). Empty: `kvstash up` spawns a local redis-server.")
    namespace: str = _f("kvstash", "Prefix of every Redis key.")
    socket_timeout_s: float = _f(5.0, "Timeout of one Redis command.")
    kv_ttl_s: int = _f(0, "Expiry of stored KV blocks, renewed on use (0: none). With maxmemory-policy "
                          "volatile-lru Redis then evicts only KV, never a session's durable history.")
    data_dir: str = _f("", "Data dir of a spawned redis-server; empty means $KVSTASH_HOME/redis.")


@dataclass
class RayConfig:
    address: str = _f("", "Ray cluster address; empty starts a local Ray instance.")
    namespace: str = _f("kvstash", "Ray namespace of the worker actors.")
    num_workers: int = _f(1, "Worker actors to run (each loads the model once).")
    num_cpus_per_worker: float = _f(0.0, "CPUs reserved per worker actor; its torch runs that many threads "
                                         "(Ray sets OMP_NUM_THREADS). 0: a local Ray instance's CPUs divided "
                                         "among the workers (kvstash up), else 1.")
    num_gpus_per_worker: float = _f(-1.0, "GPUs per worker; -1 means 1 when the cluster has GPUs, else 0.")
    local_num_cpus: int = _f(0, "CPUs of a local Ray instance; 0 means all cores.")


@dataclass
class GatewayConfig:
    host: str = _f("127.0.0.1", "Interface the gRPC gateway binds.")
    port: int = _f(50051, "gRPC port; 0 picks a free one.")
    metrics_port: int = _f(9464, "Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.")
    max_message_bytes: int = _f(4 << 20, "Largest gRPC message accepted, in bytes.")
    api_keys_file: str = _f("", "TOML file mapping API keys to tenants ([keys] key = \"tenant\"); empty allows anonymous use as tenant 'default'.")
    metrics_poll_interval_s: float = _f(2.0, "How often the gateway collects worker metrics.")
    tls_cert_file: str = _f("", "PEM certificate chain for gRPC over TLS; empty serves plaintext.")
    tls_key_file: str = _f("", "PEM private key of tls_cert_file.")
    admin_tenants: str = _f("", "Comma-separated tenants allowed operator calls (MarkPublicPrefix); without an API "
                                "keys file the anonymous tenant is an operator.")
    prefix_tokens_per_request: int = _f(
        256, "Routing: a new session goes to the worker holding the longest prefix of its prompt hot unless that "
             "worker is busier; each request running or queued there counts as this many prefix tokens.")


@dataclass
class QuotaConfig:
    max_sessions: int = _f(0, "Sessions one tenant may hold (stored in Redis); 0 means no limit.")
    max_stored_bytes: int = _f(0, "Redis bytes one tenant's sessions may hold; 0 means no limit.")
    max_tokens_per_minute: int = _f(
        0, "Prompt + generated tokens one tenant may use per minute, per gateway; 0 means no limit.")


@dataclass
class HttpConfig:
    enabled: bool = _f(True, "Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
                       "/health) beside gRPC, in the gateway process.")
    port: int = _f(8000, "HTTP API port; 0 picks a free one.")
    max_body_bytes: int = _f(1 << 20, "Largest HTTP request body accepted, in bytes (larger: 413).")
    model_name: str = _f("kvstash", "Model id the HTTP API lists and accepts (requests naming another get 404).")
    conversations_per_tenant: int = _f(64, "Stateless chat conversations kept per tenant for transparent "
                                       "continuation (their sessions; least recently used deleted beyond it; "
                                       "0: no reuse, each request's session is deleted after it).")


@dataclass
class KvstashConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig.from_spec_or_file(self.kv.spec)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KvstashConfig:
        cfg = cls()
        for section, values in d.items():
            _set_section(cfg, section, values)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> KvstashConfig:
        env = os.environ if env is None else env
        path = path or env.get("KVSTASH_CONFIG") or None
        d: dict[str, dict[str, Any]] = {}
        if path:
            d = tomllib.loads(Path(path).read_text())
        for key, raw in env.items():
            if key.startswith("KVSTASH_") and "__" in key:
                section, _, name = key[len("KVSTASH_"):].lower().partition("__")
                d.setdefault(section, {})[name] = raw
        return cls.from_dict(d)

    @property
    def cold(self) -> QuantConfig | None:
        return QuantConfig.from_spec_or_file(self.tiers.cold_spec) if self.tiers.cold_spec else None

    @property
    def block_tokens(self) -> int:
        cold = self.cold
        return self.prefix.block_tokens or default_block_tokens(
            self.quant.key_group, cold.key_group if cold is not None else 1, self.prefix.prefill_chunk)

    def validate(self) -> None:
        quant = self.quant  # raises QuantConfigError on a bad spec
        if quant.cold_only_knobs():
            raise ValueError(f"kv.spec={self.kv.spec!r}: {', '.join(quant.cold_only_knobs())} belong in "
                             "tiers.cold_spec")
        if self.block_tokens % quant.key_group or self.block_tokens <= 0:
            raise ValueError(f"prefix.block_tokens={self.prefix.block_tokens} must be a multiple of the key group "
                             f"({quant.key_group})")
        if self.prefix.prefill_chunk <= 0 or self.prefix.prefill_chunk % self.block_tokens:
            raise ValueError(f"prefix.prefill_chunk={self.prefix.prefill_chunk} must be a positive multiple of "
                             f"the block size ({self.block_tokens})")
        if self.cold is not None:
            from kvstore.codec.cold_block import check_cold

            check_cold(quant, self.cold, self.block_tokens)  # raises ColdSpecError (a ValueError)
        if not 0.0 <= self.kv.quality_sample_rate <= 1.0:
            raise ValueError("kv.quality_sample_rate must be in [0, 1]")
        if self.model.dtype not in MODEL_DTYPES:
            raise ValueError(f"model.dtype={self.model.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        if bool(self.gateway.tls_cert_file) != bool(self.gateway.tls_key_file):
            raise ValueError("gateway.tls_cert_file and gateway.tls_key_file must be set together")
        if self.session.max_requests_per_worker < 1:
            raise ValueError("session.max_requests_per_worker must be >= 1")
        _ = self.batch.sizes, self.batch.prefill_sizes  # raise on bad buckets
        if self.batch.prefill_tokens_per_step < 1:
            raise ValueError("batch.prefill_tokens_per_step must be >= 1")
        if self.ray.num_workers < 1:
            raise ValueError("ray.num_workers must be >= 1")
        if self.session.default_max_new_tokens > self.session.max_new_tokens_limit:
            raise ValueError("session.default_max_new_tokens exceeds session.max_new_tokens_limit")


def default_block_tokens(key_group: int, cold_key_group: int, prefill_chunk: int) -> int:
    """`prefix.block_tokens` 0: the smallest multiple of both key groups (cold blocks hold whole cold key
    groups) >= 128, or >= prefill_chunk when that is smaller."""
    g = math.lcm(key_group, cold_key_group)
    least = min(128, prefill_chunk) if prefill_chunk > 0 else 128
    return -(-least // g) * g


def _set_section(cfg: KvstashConfig, section: str, values: dict[str, Any]) -> None:
    if section not in {f.name for f in dataclasses.fields(cfg)}:
        raise ValueError(f"unknown config section [{section}]")
    sub = getattr(cfg, section)
    hints = get_type_hints(type(sub))
    names = {f.name for f in dataclasses.fields(sub)}
    for name, raw in values.items():
        if name not in names:
            raise ValueError(f"unknown config key {section}.{name}")
        typ = hints[name]
        try:
            value = _parse_bool(raw) if typ is bool else (typ(raw) if not isinstance(raw, typ) else raw)
        except (TypeError, ValueError):
            raise ValueError(f"config {section}.{name}={raw!r} is not a valid {typ.__name__}") from None
        setattr(sub, name, value)


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def kvstash_home() -> Path:
    return Path(os.environ.get("KVSTASH_HOME", Path.home() / ".kvstash"))


def reference_markdown() -> str:
    """The config reference table (README), rendered from the dataclasses."""
    lines = ["| key | default | env | meaning |", "| --- | --- | --- | --- |"]
    for sec in dataclasses.fields(KvstashConfig):
        for f in dataclasses.fields(sec.default_factory()):
            default = getattr(sec.default_factory(), f.name)
            env = f"KVSTASH_{sec.name.upper()}__{f.name.upper()}"
            lines.append(f"| `{sec.name}.{f.name}` | `{default!r}` | `{env}` | {f.metadata['doc']} |")
    return "\n".join(lines)
