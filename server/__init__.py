"""The service over the engine: transports (api/), the request service and its scheduling (core/), storage/."""
