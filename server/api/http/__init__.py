"""The HTTP transport: results, metrics and health beside gRPC, and fal's queue protocol over the request service."""
