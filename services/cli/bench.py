"""The `kvstash bench` argparse tree: benchmarks (services/bench), each command a `run_*(args)` there.

    kvstash bench resume [--history 512,2048] [--kv fp,int8:r128,int4:r128] [--json]  (services/bench/resume.py)
    kvstash bench batch [--concurrency 1,2,4,8,16,32] [--modes batched,interleaved,untuned,hf]  (services/bench/batch.py)
    kvstash bench bound [--sessions 16] [--prompt-tokens 64] [--new-tokens 32] [--dtype D] [--linears L]  (bound.py)
    kvstash bench chat [--users 8] [--rounds 5] [--modes default,no-tier,fp]           (services/bench/chat.py)
    kvstash bench http [--http URL] [--grpc TARGET] [--turns 6]                       (services/bench/http.py)
    kvstash bench codec [--tokens 2048] [--kv int4:g32:gv32:r128] [--json]            (services/bench/codec.py)
    kvstash bench decode [--context 512,2048] [--kv SPEC] [--rows 1,16]               (services/bench/decode.py)
    kvstash bench dedup [--sessions 100] [--prefix 1024] [--own 128] [--cluster] [--json] (services/bench/dedup.py)
    kvstash bench load [--concurrency 1,2,4,8] [--seconds 20] [--json]                (services/bench/load.py)
    kvstash bench soak [--minutes 10] [--concurrency 16] [--json]                     (services/bench/soak.py)
    kvstash bench timing [--prefix 1024] [--trials 12] [--json]                       (services/bench/timing.py)
    kvstash bench gateway [--reps 3] [--json]                                        (services/bench/gateway.py)
"""

from __future__ import annotations

from services.cli.commands import runs
from services.config import DEFAULT_KV_SPEC
from services.eval.corpus import DEFAULT_TEXT


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (speed, memory) against in-process baselines")
    kinds = bench.add_subparsers(dest="bench_cmd", required=True)
    for add in (_resume, _batch, _bound, _chat, _http, _codec, _decode, _dedup, _load, _soak, _timing, _gateway):
        add(kinds)


def _resume(kinds) -> None:
    p = kinds.add_parser("resume", help="device bytes/token, Redis bytes/session, restore vs re-prefill latency")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--history", default="512,2048", help="comma-separated history lengths in tokens")
    p.add_argument("--kv", default="fp,int8:r128,int4:r128", help="comma-separated KV specs")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="text to take the history from")
    p.add_argument("--reps", type=int, default=3, help="timed rounds; 0: sizes and exactness only, nothing timed")
    p.add_argument("--redis-url", default="", help="redis:// or redis+cluster:// (default: spawn a redis-server)")
    p.add_argument("--cold", default="", help="also store each session with this tiers.cold_spec (whole-session bytes)")
    p.add_argument("--cluster", action="store_true",
                   help="also restore from a local Redis Cluster (3 masters + 3 replicas) in the same rounds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.resume", "run_resume"))


def _batch(kinds) -> None:
    p = kinds.add_parser("batch", help="decode throughput/latency vs concurrency: kvstash batched, unpacked (no "
                                       "packed prefill), interleaved, "
                                       "and transformers' continuous batching (in process)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--kv", default="", help="kvstash KV spec (default: the service default)")
    p.add_argument("--dtype", default="", help="model dtype of every mode (default: the service default)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", default="32",
                   help="tokens per answer: N, or LO-HI drawn uniformly per call (desynchronized clients)")
    p.add_argument("--modes", default="batched,interleaved,hf")
    p.add_argument("--buckets", default="", help="batch.buckets of the batched mode (default: the service default)")
    p.add_argument("--prefill-budget", type=int, default=0,
                   help="batch.prefill_tokens_per_step of the kvstash modes (default: the service default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.batch", "run_batch"))


def _chat(kinds) -> None:
    p = kinds.add_parser("chat", help="multi-turn chat with idle sessions between rounds: kvstash vs no KV tier vs "
                                      "a full-precision tier")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--turn-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--idle", type=float, default=2.0, help="session.idle_timeout_s of the workers")
    p.add_argument("--think", type=float, default=4.0, help="seconds between rounds (> --idle)")
    p.add_argument("--modes", default="default,no-tier,fp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.chat", "run_chat"))


def _http(kinds) -> None:
    p = kinds.add_parser("http", help="HTTP API against a running stack: TTFT per turn with reuse on vs off, and "
                                      "HTTP vs gRPC")
    p.add_argument("--http", default="http://127.0.0.1:8000")
    p.add_argument("--grpc", default="127.0.0.1:50051")
    p.add_argument("--api-key", default=None)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sampled", type=int, default=0,
                   help="also N three-turn chats with a sampled second reply: where the third turn's reuse stopped")
    p.add_argument("--think", type=float, default=0.0,
                   help="seconds between turns; above the stack's session.idle_timeout_s every turn resumes from Redis")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.http", "run_http"))


def _codec(kinds) -> None:
    p = kinds.add_parser("codec", help="lossless block codec: bits per element for every predictor x coder")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--kv", default="int4:g32:gv32:r128")
    p.add_argument("--blocks", default="32,64,128", help="block sizes in tokens (multiples of the key group)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.codec", "run_codec"))


def _bound(kinds) -> None:
    p = kinds.add_parser("bound", help="the most any server gains from concurrent sessions on this machine, from "
                                       "plain transformers passes (what `bench batch`'s ratio is weighed against)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pack", type=int, default=512, help="rows of a packed prefill pass")
    p.add_argument("--linears", choices=("torch", "prepacked"), default="torch",
                   help="the linear layers' kernels: transformers' own, or prepacked as a worker runs them")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.bound", "run_bound"))


def _decode(kinds) -> None:
    p = kinds.add_parser("decode", help="a decode step at long contexts (one session or a batched pass of several): "
                                        "kvstash cache vs DynamicCache")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--context", default="512,2048")
    p.add_argument("--kv", default=DEFAULT_KV_SPEC, help="comma-separated kvstash KV specs")
    p.add_argument("--rows", default="1", help="comma-separated row counts: 1 is one session's own pass, R >= 2 one "
                                               "batched pass of R sessions (DynamicCache: a batch of R rows)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.decode", "run_decode"))


def _dedup(kinds) -> None:
    p = kinds.add_parser("dedup", help="Redis bytes of sessions sharing a prompt prefix vs storing each alone")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--kv", default=DEFAULT_KV_SPEC)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--prefix", type=int, default=1024, help="tokens of the shared prompt prefix")
    p.add_argument("--own", type=int, default=128, help="tokens of each session's own prompt")
    p.add_argument("--scenarios", default="one-tenant,public,private-tenants")
    p.add_argument("--block-tokens", type=int, default=0, help="prefix.block_tokens (0: the service default)")
    p.add_argument("--redis-url", default="", help="redis:// or redis+cluster:// (default: spawn a redis-server)")
    p.add_argument("--cluster", action="store_true",
                   help="also run every scenario on a local Redis Cluster (3 masters + 3 replicas) in the same run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.dedup", "run_dedup"))


def _load(kinds) -> None:
    p = kinds.add_parser("load", help="tokens/s and time to first token against concurrent sessions (real gRPC)")
    p.add_argument("--target", default="", help="a running gateway; empty starts one (kvstash up)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--metrics-url", default="", help="the gateway's /metrics (with --target) for offload/restore counts")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--kv", default="")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=20.0, help="the measured window of each concurrency")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds each concurrency runs before its measured window (0: from the first call)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--resume-every", type=int, default=4, help="every k-th call evicts and resumes a session (0: never)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.load", "run_load"))


def _soak(kinds) -> None:
    p = kinds.add_parser("soak", help="load with injected faults, then count lost sessions (must be 0)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--kv", default="")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--fault-every", type=float, default=30.0)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.soak", "run_soak"))


def _timing(kinds) -> None:
    p = kinds.add_parser("timing", help="does TTFT reveal another tenant's cached prefix? (private vs public)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.timing", "run_timing"))


def _gateway(kinds) -> None:
    p = kinds.add_parser("gateway", help="gateway import time, RSS and image packages vs the worker stack")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=runs("services.bench.gateway", "run_gateway"))
