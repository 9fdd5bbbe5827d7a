"""The training engine: batches, the loop, evaluation, checkpoints and the stage cache."""
