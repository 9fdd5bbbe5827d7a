"""Evaluation: test-split metrics, model cost (params, FLOPs, latency) and the printed table."""
