"""The size of what crosses a transport, the same on every port."""

# Two 10,000-character prompts are < 100 kB even in 4-byte UTF-8: a request body or message past this is refused.
MAX_REQUEST_BYTES = 1 << 20
# 8 PNGs of 2048x2048 RGB are at most ~8 x 12.6 MB plus framing; 256 MiB leaves room for incompressible data.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# Seconds a 503 (the queue is full, the store cannot be reached, the server is starting) asks callers to wait
RETRY_AFTER_S = 5
