"""Binary codecs: the versioned container, the tensor bundle and the KV-state encoding (never pickle)."""
