"""Code shared by the control plane and the embed service: errors, auth, logging, path safety, metrics."""
