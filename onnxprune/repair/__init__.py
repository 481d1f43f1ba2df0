"""Repairing the damage of a cut: calibration statistics and least-squares reconstruction."""
