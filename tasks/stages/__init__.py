"""The stages: one module per branch (a stage = its params, its contract, its task)."""
