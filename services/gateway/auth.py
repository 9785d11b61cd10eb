"""`Authenticator`: API key -> tenant.

Keys come from a TOML file (`[keys]` table: `"<api key>" = "<tenant>"`). Callers send
`authorization: Bearer <api key>` metadata. Keys are held only as blake2b digests and compared in
constant time, and never logged. With no key file, every caller is the tenant `default` (local use).
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path

from services.errors import PermissionDenied, Unauthenticated
from services.wire import ID_RE

ANONYMOUS_TENANT = "default"


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=32, person=b"kvstash-apikey").digest()


class Authenticator:
    def __init__(self, keys: dict[str, str] | None, admins: str = ""):
        self.open = keys is None
        self.admins = {t.strip() for t in admins.split(",") if t.strip()}
        self._tenants: dict[bytes, str] = {}
        for key, tenant in (keys or {}).items():
            if not ID_RE.fullmatch(tenant):
                raise ValueError(f"tenant name {tenant!r} must match {ID_RE.pattern}")
            self._tenants[_digest(key)] = tenant

    @classmethod
    def from_file(cls, path: str, admins: str = "") -> Authenticator:
        if not path:
            return cls(None, admins)
        data = tomllib.loads(Path(path).read_text())
        keys = data.get("keys")
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ValueError(f"{path}: expected a [keys] table of \"api key\" = \"tenant\"")
        return cls(keys, admins)

    def tenant(self, metadata) -> str:
        """The tenant of a call's metadata (iterable of (key, value)); raises Unauthenticated."""
        if self.open:
            return ANONYMOUS_TENANT
        auth = next((v for k, v in metadata or () if k == "authorization"), None)
        if not auth or not isinstance(auth, str) or not auth.startswith("Bearer "):
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <api key>' metadata")
        digest = _digest(auth[len("Bearer "):].strip())
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise Unauthenticated("unknown API key")

    def admin(self, metadata) -> str:
        """The tenant of an operator call; PermissionDenied for a tenant not in gateway.admin_tenants."""
        tenant = self.tenant(metadata)
        if not self.open and tenant not in self.admins:
            raise PermissionDenied("this call is for operators (gateway.admin_tenants)")
        return tenant
