"""Exec runtime: KV cache, step graphs, sampling, backends, executors (TP)."""
