"""The ONNX file format at the edge: loading, saving, shape inference, exporting edited graphs, path safety."""
