"""The config: its typed schema (schema.py) and the checks that run before any training."""
