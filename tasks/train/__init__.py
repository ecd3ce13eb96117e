"""Training: the loop, data-parallel, ONNX export, the training flow's steps."""
