"""The stages of a run: a model in a role (teacher, baseline, student, ...) trained or loaded through the stage cache."""
