"""`HistoryJournal`: an append-only local copy of every session history a worker writes.

Redis (with AOF) is the primary durable store of session manifests. The journal is the second copy that
makes "a session's token history is never lost" hold when Redis loses data anyway — FLUSHALL, a wiped
volume, a manifest evicted by an `allkeys-*` policy, or Redis being unreachable for a while: the worker
finds the newest record of the session in the journals and writes it back.

Each writer (worker) appends to its own file `<dir>/<writer>.journal`; every writer reads every file of
the directory, so workers sharing a directory (one host, or a shared volume) recover each other's
sessions. Record layout (little-endian):

    4  magic b"KVJ1"        1  kind (1 manifest, 2 tombstone)     2  key length   key (utf-8 "tenant/session")
    8  time (f64, unix s)   4  payload length   payload (a manifest container; empty for a tombstone)
    16 blake2b-128 checksum of everything before it in the record

Invariants:
- A lookup returns the payload of the newest record of a key across all files (by time, then file name),
  or None when that record is a tombstone (deleted sessions are never resurrected) or there is none.
- A torn or corrupt record ends a file's readable part; records before it stay valid. A writer cuts its
  own file back to its last valid record when it opens it, so its appends after a crash are readable.
- Payloads are returned as stored: the caller decodes and validates them (never unpickled).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.digest import checksum

MAGIC = b"KVJ1"
MANIFEST, TOMBSTONE = 1, 2
_HEAD = struct.Struct("<4sBH")
_TAIL = struct.Struct("<dI")
_SUM = 16
MAX_PAYLOAD = 64 << 20


def _record(kind: int, key: str, t: float, payload: bytes) -> bytes:
    k = key.encode("utf-8")
    body = _HEAD.pack(MAGIC, kind, len(k)) + k + _TAIL.pack(t, len(payload)) + payload
    return body + checksum(body, digest_size=_SUM)


@dataclass
class _File:
    """What is known of one journal file: key -> (time, kind, payload offset, payload length)."""

    path: Path
    ino: int = -1
    scanned: int = 0
    index: dict[str, tuple[float, int, int, int]] = field(default_factory=dict)

    def refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.ino, self.scanned, self.index = -1, 0, {}
            return
        if st.st_ino != self.ino or st.st_size < self.scanned:  # replaced by compaction: read it again
            self.ino, self.scanned, self.index = st.st_ino, 0, {}
        if st.st_size == self.scanned:
            return
        with open(self.path, "rb") as f:
            f.seek(self.scanned)
            data = f.read(st.st_size - self.scanned)
        pos = 0
        while pos + _HEAD.size <= len(data):
            magic, kind, klen = _HEAD.unpack_from(data, pos)
            at = pos + _HEAD.size + klen
            if magic != MAGIC or kind not in (MANIFEST, TOMBSTONE) or at + _TAIL.size > len(data):
                break
            t, plen = _TAIL.unpack_from(data, at)
            end = at + _TAIL.size + plen
            if plen > MAX_PAYLOAD or end + _SUM > len(data):
                break
            if checksum(data[pos:end], digest_size=_SUM) != data[end:end + _SUM]:
                break
            key = data[pos + _HEAD.size:at].decode("utf-8", errors="replace")
            self.index[key] = (t, kind, self.scanned + at + _TAIL.size, plen)
            pos = end + _SUM
        self.scanned += pos

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


class HistoryJournal:
    def __init__(self, directory: str | Path, writer: str, fsync_interval_s: float = 1.0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{writer}.journal"
        self.fsync_interval_s = fsync_interval_s
        self._files: dict[Path, _File] = {}
        own = self._file(self.path)
        own.refresh()
        if self.path.exists() and self.path.stat().st_size > own.scanned:  # a torn tail from a crash
            os.truncate(self.path, own.scanned)
            own.ino = -1
        self._fh = open(self.path, "ab")  # noqa: SIM115 - the journal appends to it until close()
        self._last_sync = 0.0

    # ---- writing -------------------------------------------------------------------------------------
    def append(self, tenant: str, session_id: str, manifest: bytes | None) -> None:
        """Record a session's manifest, or (None) that it was deleted."""
        kind = TOMBSTONE if manifest is None else MANIFEST
        self._fh.write(_record(kind, f"{tenant}/{session_id}", time.time(), manifest or b""))
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval_s:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def compact(self) -> int:
        """Rewrite this writer's file with only the newest record of each key; returns its new size."""
        own = self._file(self.path)
        own.refresh()
        tmp = self.path.with_suffix(".compact")
        with open(tmp, "wb") as f:
            for key, (t, kind, off, n) in sorted(own.index.items(), key=lambda kv: kv[1][0]):
                f.write(_record(kind, key, t, own.read(off, n) if kind == MANIFEST else b""))
            f.flush()
            os.fsync(f.fileno())
        self._fh.close()
        os.replace(tmp, self.path)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - the journal appends to it until close()
        return self.path.stat().st_size

    def close(self) -> None:
        try:
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()

    # ---- reading -------------------------------------------------------------------------------------
    def _file(self, path: Path) -> _File:
        return self._files.setdefault(path, _File(path))

    def _all(self) -> list[_File]:
        files = [self._file(p) for p in sorted(self.dir.glob("*.journal"))]
        for f in files:
            f.refresh()
        return files

    def lookup(self, tenant: str, session_id: str) -> bytes | None:
        """The newest recorded manifest of the session, or None (never recorded, or deleted)."""
        key, best = f"{tenant}/{session_id}", None
        for f in self._all():
            rec = f.index.get(key)
            if rec is not None and (best is None or rec[0] >= best[1][0]):
                best = (f, rec)
        if best is None or best[1][1] == TOMBSTONE:
            return None
        f, (_, _, off, n) = best
        return f.read(off, n)

    def live(self) -> list[tuple[str, str, bytes]]:
        """(tenant, session id, newest manifest) of every session the journals hold and did not delete."""
        newest: dict[str, tuple[float, _File, int, int, int]] = {}
        for f in self._all():
            for key, (t, kind, off, n) in f.index.items():
                if key not in newest or t >= newest[key][0]:
                    newest[key] = (t, f, kind, off, n)
        out = []
        for key, (_, f, kind, off, n) in newest.items():
            if kind == MANIFEST:
                tenant, _, sid = key.partition("/")
                out.append((tenant, sid, f.read(off, n)))
        return out
