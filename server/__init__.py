"""The gRPC service for the engine: servicer, scheduler, durable store, metrics, auth, client and CLI."""
