"""The transports: thin adapters that translate a wire format into calls of the request service (server/core)."""
