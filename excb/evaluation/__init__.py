"""Measuring a representation: kNN and linear probes, the eval runs and ``excb eval``, the reference probe, and
fitting the served embedding's whitening on a run's own images."""
