"""The `kdrun` command: argv handling, help, Hydra entry point and exit codes (main.py)."""
