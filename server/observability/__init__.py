"""What the server tells its operators: Prometheus metrics and structured, rate-limited logs."""
