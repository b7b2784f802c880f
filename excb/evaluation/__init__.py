"""Measuring a representation: kNN and linear probes, the eval runs and ``excb eval``, the reference probe."""
