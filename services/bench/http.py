"""`kvstash bench http`: TTFT per turn of a resent-history chat over the HTTP API, reuse on vs off, and the
HTTP front's overhead over gRPC for the same call, against a running stack (`kvstash up`).

    kvstash bench http [--http http://127.0.0.1:8000] [--grpc 127.0.0.1:50051] [--api-key K] [--turns 6]
                       [--new-tokens 32] [--think S] [--sampled N] [--json]

Each turn resends the whole history (as OpenAI clients do) with greedy decoding. `reuse` conversations keep
one system prompt, so turn k is served by a fork of turn k-1's session (transparent continuation: only the
new turn is prefilled); `no-reuse` ones open with a unique nonce each turn, so neither a remembered
conversation nor a stored block matches and every turn prefills its whole history. Per turn it also reports
the counts `prompt_tokens` and `cached_tokens` (the HTTP usage). `--think S` waits S seconds before each turn:
above the stack's `session.idle_timeout_s`, every parent has gone to Redis and each turn resumes from there.
`grpc` makes the same call as each `reuse` turn over gRPC: `Generate` with `fork_of` = the same parent
session and only the new user turn (the same worker work: copy the parent, prefill the new turn), run first,
so both forks find the parent in the same place (after a think time over the idle timeout: Redis).
Ratios: `ttft_no_reuse_over_reuse` and `ttft_http_over_grpc` per turn. `--sampled N` adds N three-turn chats
whose second reply is sampled and counts where the third turn's reuse stopped: a resent reply that
re-tokenizes differently from the generated tokens cannot be forked, so the turn before it is.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

SYSTEM = ("You are a concise assistant. Answer in two or three short sentences, in plain words, without lists. "
          "Say so when you are not sure of a fact and never invent names, dates or numbers. ") * 4
TURNS = ["Tell me about the moon.", "How far away is it?", "Who first walked on it?", "What did they bring back?",
         "Could people live there?", "Summarise our talk in one line.", "Thanks. And Mars?", "How far is Mars?"]


@dataclass
class HttpTurn:
    """One streamed HTTP chat call: time to its first text, the reply, usage counts and its session."""

    ttft_s: float
    text: str
    cached_tokens: int
    prompt_tokens: int
    completion_tokens: int
    session_id: str


def _http_turn(client, model: str, history: list[dict], n: int, temperature: float = 0.0,
               seed: int | None = None) -> HttpTurn:
    t0 = time.perf_counter()
    ttft, parts, cached, prompt, completion, sid = None, [], 0, 0, 0, ""
    for ch in client.chat.completions.create(model=model, messages=history, max_tokens=n, temperature=temperature,
                                             seed=seed, stream=True, stream_options={"include_usage": True}):
        sid = sid or getattr(ch, "session_id", "") or ""
        if ch.choices and ch.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            cached, prompt = ch.usage.prompt_tokens_details.cached_tokens, ch.usage.prompt_tokens
            completion = ch.usage.completion_tokens
    return HttpTurn(ttft or 0.0, "".join(parts), cached, prompt, completion, sid)


def _grpc_fork_ttft(grpc_client, parent: str, turn: dict, n: int) -> float:
    """TTFT of gRPC Generate forking `parent` with the one new turn (then the fork is deleted)."""
    t0, ttft, sid = time.perf_counter(), 0.0, ""
    for msg in grpc_client.generate_stream(messages=[turn], max_new_tokens=n, fork_of=parent):
        sid = sid or msg.session_id
        if msg.text and not ttft:
            ttft = time.perf_counter() - t0
    grpc_client.delete_session(sid)
    return ttft


def _sampled(client, model: str, conversations: int, n: int) -> dict:
    """Of `conversations` three-turn chats whose second reply is sampled (temperature 0.8, seed i), how many
    third turns forked the second turn's session (the sampled reply, resent as text, re-tokenized into the
    very tokens the model generated), how many forked the first turn's instead (it did not: reuse stops at
    the turn before the difference), and how many forked nothing."""
    out = {"conversations": conversations, "forked_sampled_turn": 0, "forked_turn_before": 0, "no_fork": 0}
    for i in range(conversations):
        t1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{TURNS[i % len(TURNS)]} ({i})"}]
        a = _http_turn(client, model, t1, n)
        t2 = [*t1, {"role": "assistant", "content": a.text}, {"role": "user", "content": "Tell me more."}]
        b = _http_turn(client, model, t2, n, temperature=0.8, seed=i)
        c = _http_turn(client, model, [*t2, {"role": "assistant", "content": b.text},
                                       {"role": "user", "content": "Go on."}], 1)
        if c.cached_tokens == b.prompt_tokens + b.completion_tokens - 1:
            out["forked_sampled_turn"] += 1
        elif c.cached_tokens == a.prompt_tokens + a.completion_tokens - 1:
            out["forked_turn_before"] += 1
        else:
            out["no_fork"] += 1
    return out


def run_http(args) -> int:
    from openai import OpenAI

    from services.client import KvstashClient

    client = OpenAI(base_url=args.http.rstrip("/") + "/v1", api_key=args.api_key or "none", max_retries=0,
                    timeout=600)
    model = client.models.list().data[0].id
    rows, parent = [], ""
    with KvstashClient(args.grpc, api_key=args.api_key, timeout=600) as g:
        hist = {"reuse": [{"role": "system", "content": SYSTEM}],
                "no-reuse": [{"role": "system", "content": SYSTEM}]}
        for turn, q in enumerate(TURNS[:args.turns], 1):
            time.sleep(args.think)
            row = {"turn": turn}
            if parent:
                row["grpc_ttft_s"] = _grpc_fork_ttft(g, parent, {"role": "user", "content": q}, args.new_tokens)
            for mode, h in hist.items():
                h.append({"role": "user", "content": q})
                sent = h if mode == "reuse" else [{"role": "system", "content": uuid.uuid4().hex + " " + SYSTEM}] + h[1:]
                got = _http_turn(client, model, sent, args.new_tokens)
                row[mode] = {"ttft_s": got.ttft_s, "cached_tokens": got.cached_tokens, "prompt_tokens": got.prompt_tokens}
                h.append({"role": "assistant", "content": got.text})
                parent = got.session_id if mode == "reuse" else parent
            row["ttft_no_reuse_over_reuse"] = row["no-reuse"]["ttft_s"] / max(row["reuse"]["ttft_s"], 1e-9)
            if "grpc_ttft_s" in row:
                row["ttft_http_over_grpc"] = row["reuse"]["ttft_s"] / max(row["grpc_ttft_s"], 1e-9)
            rows.append(row)
    sampled = _sampled(client, model, args.sampled, args.new_tokens) if args.sampled else None
    if args.json:
        print(json.dumps({"turns": rows, "sampled": sampled}, indent=2))
    else:
        print("turn  prompt  reuse_ttft  cached  no_reuse_ttft  ratio  grpc_fork_ttft  http/grpc")
        for r in rows:
            print(f"{r['turn']:>4}  {r['reuse']['prompt_tokens']:6d}  {r['reuse']['ttft_s']:10.3f}  "
                  f"{r['reuse']['cached_tokens']:6d}  "
                  f"{r['no-reuse']['ttft_s']:13.3f}  {r['ttft_no_reuse_over_reuse']:5.2f}  "
                  f"{r.get('grpc_ttft_s', float('nan')):14.3f}  {r.get('ttft_http_over_grpc', float('nan')):9.2f}")
        if sampled:
            print(f"sampled replies resent: {sampled}")
    return 0
