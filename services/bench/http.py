"""`kvstash bench http`: TTFT per turn of a resent-history chat over the HTTP API, reuse on vs off, and the
HTTP front's overhead over gRPC for the same request, against a running stack (`kvstash up`).

    kvstash bench http [--http http://127.0.0.1:8000] [--grpc 127.0.0.1:50051] [--api-key K] [--turns 6]
                       [--new-tokens 32] [--json]

Each turn resends the whole history (as OpenAI clients do) with greedy decoding. `reuse` conversations keep
one system prompt, so turn k continues turn k-1's session (transparent continuation: only the new turn is
prefilled); `no-reuse` ones open with a unique nonce each turn, so neither a remembered conversation nor a
stored block matches and every turn prefills its whole history. Per turn it also reports the counts
`prompt_tokens` and `cached_tokens` (the HTTP usage). `grpc` sends each `reuse` turn's history
through gRPC Generate too (same tenant and blocks), right after HTTP stored that same prompt, so gRPC may adopt
one pass more than HTTP did: read `ttft_http_over_grpc` as an upper bound of the front's overhead. Ratios:
`ttft_no_reuse_over_reuse` per turn and `ttft_http_over_grpc` per turn.
"""

from __future__ import annotations

import json
import time
import uuid

SYSTEM = ("You are a concise assistant. Answer in two or three short sentences, in plain words, without lists. "
          "Say so when you are not sure of a fact and never invent names, dates or numbers. ") * 4
TURNS = ["Tell me about the moon.", "How far away is it?", "Who first walked on it?", "What did they bring back?",
         "Could people live there?", "Summarise our talk in one line.", "Thanks. And Mars?", "How far is Mars?"]


def _http_turn(client, model: str, history: list[dict], n: int) -> tuple[float, str, int, int]:
    t0 = time.perf_counter()
    ttft, parts, cached, prompt = None, [], 0, 0
    for ch in client.chat.completions.create(model=model, messages=history, max_tokens=n, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            cached, prompt = ch.usage.prompt_tokens_details.cached_tokens, ch.usage.prompt_tokens
    return ttft or 0.0, "".join(parts), cached, prompt


def _grpc_ttft(grpc_client, history: list[dict], n: int) -> float:
    t0 = time.perf_counter()
    for msg in grpc_client.generate_stream(messages=history, max_new_tokens=n):
        if msg.text:
            return time.perf_counter() - t0
    return 0.0


def run_http(args) -> int:
    from openai import OpenAI

    from services.client import KvstashClient

    client = OpenAI(base_url=args.http.rstrip("/") + "/v1", api_key=args.api_key or "none", max_retries=0,
                    timeout=600)
    model = client.models.list().data[0].id
    rows = []
    with KvstashClient(args.grpc, api_key=args.api_key, timeout=600) as g:
        hist = {"reuse": [{"role": "system", "content": SYSTEM}],
                "no-reuse": [{"role": "system", "content": SYSTEM}]}
        for turn, q in enumerate(TURNS[:args.turns], 1):
            row = {"turn": turn}
            for mode, h in hist.items():
                h.append({"role": "user", "content": q})
                sent = h if mode == "reuse" else [{"role": "system", "content": uuid.uuid4().hex + " " + SYSTEM}] + h[1:]
                ttft, text, cached, prompt = _http_turn(client, model, sent, args.new_tokens)
                row[mode] = {"ttft_s": ttft, "cached_tokens": cached, "prompt_tokens": prompt}
                h.append({"role": "assistant", "content": text})
            row["grpc_ttft_s"] = _grpc_ttft(g, hist["reuse"][:-1], args.new_tokens)
            row["ttft_no_reuse_over_reuse"] = row["no-reuse"]["ttft_s"] / max(row["reuse"]["ttft_s"], 1e-9)
            row["ttft_http_over_grpc"] = row["reuse"]["ttft_s"] / max(row["grpc_ttft_s"], 1e-9)
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("turn  prompt  reuse_ttft  cached  no_reuse_ttft  ratio  grpc_ttft  http/grpc")
        for r in rows:
            print(f"{r['turn']:>4}  {r['reuse']['prompt_tokens']:6d}  {r['reuse']['ttft_s']:10.3f}  "
                  f"{r['reuse']['cached_tokens']:6d}  "
                  f"{r['no-reuse']['ttft_s']:13.3f}  {r['ttft_no_reuse_over_reuse']:5.2f}  {r['grpc_ttft_s']:9.3f}  "
                  f"{r['ttft_http_over_grpc']:9.2f}")
    return 0
