"""Changing the graph: channel surgery, depth (block) removal, element and N:M sparsity."""
