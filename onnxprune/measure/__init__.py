"""Measuring models: parameters, bytes and MACs, fidelity against the original, latency."""
