"""`kvstash` command line: up | chat | model pull | config | public-prefix | bench | eval."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from services.config import KvstashConfig, reference_markdown


def _load_config(args) -> KvstashConfig:
    cfg = KvstashConfig.load(getattr(args, "config", None))
    for attr, (section, name) in {"model": ("model", "name"), "kv": ("kv", "spec"), "port": ("gateway", "port"),
                                  "host": ("gateway", "host"), "metrics_port": ("gateway", "metrics_port"),
                                  "workers": ("ray", "num_workers"), "redis_url": ("redis", "url")}.items():
        value = getattr(args, attr, None)
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    cfg.validate()
    return cfg


def cmd_up(args) -> int:
    from services.runtime.stack import LocalStack

    cfg = _load_config(args)

    async def run() -> None:
        stack = await LocalStack(cfg).start()
        print(f"kvstash gateway listening on {stack.address}", flush=True)
        print(f"metrics on http://{cfg.gateway.host}:{stack.gateway.metrics_port}/metrics", flush=True)
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                json.dump({"grpc": stack.address, "metrics_port": stack.gateway.metrics_port,
                           "http_port": stack.gateway.http_port,
                           "redis_url": stack.cfg.redis.url}, f)
            import os
            os.replace(args.ready_file + ".tmp", args.ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("shutting down", flush=True)
        await stack.stop()

    asyncio.run(run())
    return 0


def cmd_model_pull(args) -> int:
    from services.worker.model_store import store_for

    cfg = _load_config(args)
    path = store_for(cfg.model.cache_dir).pull(args.name, force=args.force)
    print(path)
    return 0


def cmd_config(args) -> int:
    print(reference_markdown())
    return 0


def cmd_chat(args) -> int:
    from services.cli.chat import run_chat

    return run_chat(args.target, args.session, args.api_key, args.max_new_tokens)


def cmd_public_prefix(args) -> int:
    from services.client import KvstashClient

    text = Path(args.file).read_text(encoding="utf-8") if args.file else args.text
    if text is None:
        print("give --file or --text", file=sys.stderr)
        return 2
    with KvstashClient(args.target, api_key=args.api_key, timeout=600) as c:
        res = (c.mark_public_prefix(messages=[{"role": "system", "content": text}]) if args.system
               else c.mark_public_prefix(text))
    print(json.dumps({"prompt_tokens": res.prompt_tokens, "shared_tokens": res.shared_tokens,
                      "newly_registered": res.newly_registered}))
    return 0


def cmd_migrate_layout(args) -> int:
    import dataclasses

    from kvstore.tiers.legacy_layout import LayoutMigration
    from kvstore.tiers.redis_tier import RedisTier
    from services.runtime.redis_url import redis_client

    tier = RedisTier(redis_client(args.redis_url, 30.0), namespace=args.namespace)
    print(json.dumps(dataclasses.asdict(LayoutMigration(tier).run(force=args.force))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstash", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run Redis (spawned), Ray, workers, gateway and metrics locally")
    up.add_argument("--config", help="TOML config file (see `kvstash config`)")
    up.add_argument("--model", help="model name, HF folder or hub id")
    up.add_argument("--kv", help="KV quantization spec, e.g. int4, int8:r64, fp")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--metrics-port", type=int)
    up.add_argument("--workers", type=int)
    up.add_argument("--redis-url", help="use this Redis instead of spawning one")
    up.add_argument("--ready-file", help="write {grpc, metrics_port} JSON here once serving")
    up.set_defaults(fn=cmd_up)

    model = sub.add_parser("model", help="manage models").add_subparsers(dest="model_cmd", required=True)
    pull = model.add_parser("pull", help="fetch and convert the default model (SmolLM2-135M-Instruct)")
    pull.add_argument("--name", default="smollm2-135m-instruct")
    pull.add_argument("--force", action="store_true")
    pull.add_argument("--config")
    pull.set_defaults(fn=cmd_model_pull)

    cfg = sub.add_parser("config", help="print the config reference")
    cfg.set_defaults(fn=cmd_config)

    chat = sub.add_parser("chat", help="interactive chat with a running gateway")
    chat.add_argument("--target", default="127.0.0.1:50051")
    chat.add_argument("--session", default="", help="resume this session id")
    chat.add_argument("--api-key", default=None)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(fn=cmd_chat)

    pub = sub.add_parser("public-prefix", help="operators: share a prompt prefix (a system prompt) with every tenant")
    pub.add_argument("--target", default="127.0.0.1:50051")
    pub.add_argument("--api-key", default=None)
    pub.add_argument("--file", help="read the prefix text from this file")
    pub.add_argument("--text", help="the prefix text")
    pub.add_argument("--system", action="store_true", help="render it as a chat system turn (what chats start with)")
    pub.set_defaults(fn=cmd_public_prefix)

    mig = sub.add_parser("migrate-layout", help="operators: move sessions stored with the pre-issue-17 Redis key "
                         "layout to the spread layout (workers also do it at start)")
    mig.add_argument("--redis-url", required=True, help="redis://... or redis+cluster://...")
    mig.add_argument("--namespace", default="kvstash", help="redis.namespace of the deployment")
    mig.add_argument("--force", action="store_true", help="scan again even if a previous run finished")
    mig.set_defaults(fn=cmd_migrate_layout)

    from services.cli.bench import add_bench_parser
    from services.cli.eval import add_eval_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
