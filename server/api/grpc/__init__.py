"""The gRPC transport: the pixart.v1 servicer over the request service, its interceptors and the port."""
