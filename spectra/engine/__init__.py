"""engine: kernels (what to compute per matrix) × executors (where); run() is the entry point."""
