"""Reverse-mode differentiation of ONNX graphs into standard ONNX ops (the backward pass of training)."""
