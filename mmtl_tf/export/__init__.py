"""Export: TensorFlow functions with explicit parameters, SavedModel, ONNX, the manifest."""
