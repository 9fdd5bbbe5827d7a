"""TensorBoard output: the writer, run summaries, soft-target figures."""
