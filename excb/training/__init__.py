"""One training run: the loop, budgets and recipes, checkpoints and resume, distribution, seeds, run loggers."""
