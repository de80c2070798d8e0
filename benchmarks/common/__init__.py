"""What several benchmarks share: where they run and write, the machine and versions a figure was measured with,
the prompts, image comparison and result writing."""
