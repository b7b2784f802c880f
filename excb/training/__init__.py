"""One training run: the loop, its plan (recipe, budget), checkpoints and resume, the teacher loader, run logs."""
