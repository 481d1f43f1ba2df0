"""Channel dependency analysis: which channels must be removed together, and which must never be."""
