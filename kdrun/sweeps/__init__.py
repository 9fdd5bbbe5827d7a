"""Sweeps: Hydra callbacks, job bookkeeping, resuming a sweep and the sweep report (kdrun-report)."""
