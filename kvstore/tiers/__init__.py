"""Storage tiers: the durable session manifest and the Redis tier that holds it (and the encoded KV)."""
