"""`StopMatcher`: stop sequences over streamed text, without ever streaming part of a stop sequence.

`push(delta)` returns (text safe to send, hit). Text that could still grow into a stop sequence (a suffix
of what was generated that is a prefix of some stop string) is held back until it cannot. On a hit the
returned text ends just before the stop sequence, which is not sent; the tokens that produced it stay in
the session's history (they were generated). `flush()` releases what is held back when generation ends
for another reason.
"""

from __future__ import annotations

from services.wire import MAX_STOP_CHARS, MAX_STOPS  # noqa: F401 - the limits live on the wire


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, delta: str) -> tuple[str, bool]:
        self.buf += delta
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
