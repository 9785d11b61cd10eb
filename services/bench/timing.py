"""`kvstash bench timing`: does time to first token reveal another tenant's cached prompt prefix?

    kvstash bench timing [--model M] [--prefix 1024] [--trials 12] [--json]

Starts `kvstash up` with tenant A, an operator and one fresh tenant per trial. Tenant A sends prompts that
start with a prefix P, so P's KV is hot in the worker and stored. Then in each trial a tenant B that never
sent P sends, in random order, P plus a few tokens of its own and a control prompt Q (random tokens, same
length) plus the same tokens (a fresh B per trial: B's own cache must not explain a fast P); the
client measures time to first token of both over real gRPC. With private salts B's P must be no faster
than Q (no cross-tenant hit; the difference is noise). The operator then marks P public, and the same
measurement shows the designed speed-up for everyone. Reported per phase: median and mean TTFT of P and
Q, their difference, and Welch's t.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path


def _ttft(client, ids) -> float:
    t0 = time.perf_counter()
    for msg in client.generate_stream(token_ids=ids, max_new_tokens=1):
        if msg.token_ids:
            return time.perf_counter() - t0
    raise RuntimeError("no token came back")


def _welch(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    return (statistics.mean(a) - statistics.mean(b)) / max((va + vb) ** 0.5, 1e-12)


def _phase(target, keys, system, rng) -> dict:
    """One trial per key: a tenant that never sent P sends P + own tokens and a control Q + the same tokens
    (in random order), so its own cache can never explain a fast P."""
    from services.client import KvstashClient

    p_times, q_times = [], []
    for key in keys:
        own = [rng.randrange(1000, 20000) for _ in range(8)]
        control = [rng.randrange(1000, 20000) for _ in range(len(system))]
        with KvstashClient(target, api_key=key, timeout=600) as b:
            for kind in rng.sample(["p", "q"], 2):
                (p_times if kind == "p" else q_times).append(_ttft(b, (system if kind == "p" else control) + own))
    return {"ttft_prefix_median_s": statistics.median(p_times), "ttft_control_median_s": statistics.median(q_times),
            "ttft_prefix_mean_s": statistics.mean(p_times), "ttft_control_mean_s": statistics.mean(q_times),
            "difference_s": statistics.mean(p_times) - statistics.mean(q_times), "welch_t": _welch(p_times, q_times)}


def run_timing(args) -> int:
    from services.bench.common import models_dir
    from services.client import KvstashClient
    from services.config import ModelConfig
    from services.eval.corpus import load_ids
    from services.runtime.process import ServiceProcess
    from services.worker.model_runner import ModelRunner

    system = load_ids(ModelRunner.from_config(ModelConfig(name=args.model)), args.text, args.prefix)
    home = Path(tempfile.mkdtemp(prefix="kvstash-timing-"))
    fresh = [f"key-b{i}" for i in range(2 * args.trials)]  # a new tenant per trial and phase
    (home / "keys.toml").write_text('[keys]\n"key-a" = "alpha"\n"key-ops" = "ops"\n'
                                    + "".join(f'"{k}" = "beta{i}"\n' for i, k in enumerate(fresh)))
    svc = ServiceProcess(home / "service", {"KVSTASH_MODEL__NAME": args.model, "KVSTASH_MODEL__CACHE_DIR": models_dir(),
                                            "KVSTASH_HOME": str(home),
                                            "KVSTASH_GATEWAY__API_KEYS_FILE": str(home / "keys.toml"),
                                            "KVSTASH_GATEWAY__ADMIN_TENANTS": "ops"}).start(timeout=600)
    rng = random.Random(0)
    out = {"prefix_tokens": len(system), "trials": args.trials}
    try:
        with KvstashClient(svc.target, api_key="key-a", timeout=600) as a, \
                KvstashClient(svc.target, api_key="key-ops", timeout=600) as ops:
            for i in range(2):
                a.generate(token_ids=system + [100 + i], max_new_tokens=1)  # alpha's prefix is hot and stored
            out["private"] = _phase(svc.target, fresh[:args.trials], system, rng)
            ops.mark_public_prefix(token_ids=system)
            out["public"] = _phase(svc.target, fresh[args.trials:], system, rng)
    finally:
        svc.stop()
    print(json.dumps(out, indent=None if args.json else 1))
    return 0
