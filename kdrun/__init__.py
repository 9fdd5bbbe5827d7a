"""kdrun: knowledge-distillation experiments in one command."""

__version__ = "0.1.0"
