"""Looks inside a (trained) model: `python -m cogniedit_jax.analysis.focus_map` (the paper's Fig. 7)."""
