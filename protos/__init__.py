"""The gRPC contract (pixart.v1) and its generated Python stubs; regenerate with `python -m protos.generate`."""
