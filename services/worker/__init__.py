"""Celery workers: lease a job, run the trainer as a child process, export, parity-check, register."""
