"""One experiment run: the pipeline (pipeline.py), its results (metrics.json, table), failures and resume."""
