"""The server's core: work items, the scheduler, the engine loop, the output side, the request service, replicas."""
