"""Control plane: the jobs/models HTTP API, `excb up` (embedded mode) and the `excb jobs` client."""
