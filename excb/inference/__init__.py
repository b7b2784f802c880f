"""Using a trained run: the ONNX export and runtime, eval pixels, cluster assignment, embedding a folder, the
fine-tuning weights export."""
