"""Planning the cut: how many channels each group loses (uniform, global, budgets, sensitivity)."""
