"""Storage tiers: the session manifest (durable token history) and the Redis tier."""
