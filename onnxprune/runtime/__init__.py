"""onnxruntime at the edge: device choice, sessions, feeds and intermediate-tensor capture."""
