"""`kvstash chat`: an interactive terminal chat that can resume a session by id."""

from __future__ import annotations

import sys

import grpc

from services.client import KvstashClient


def run_chat(target: str, session: str, api_key: str | None, max_new_tokens: int) -> int:
    client = KvstashClient(target, api_key=api_key)
    sid = session
    print(f"kvstash chat on {target}; empty line or Ctrl-D quits." + (f" Resuming {sid}." if sid else ""))
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages = [{"role": "user", "content": line}]
        try:
            stream = (client.resume_stream(sid, messages=messages, max_new_tokens=max_new_tokens) if sid
                      else client.generate_stream(messages=messages, max_new_tokens=max_new_tokens))
            sys.stdout.write("bot> ")
            for msg in stream:
                sid = msg.session_id or sid
                sys.stdout.write(msg.text)
                sys.stdout.flush()
            print()
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}")
    if sid:
        print(f"session: {sid} (resume with: kvstash chat --session {sid})")
    client.close()
    return 0
