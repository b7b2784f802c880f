"""Embedding / cluster-assignment service: ONNX Runtime, micro-batching, live balance."""
