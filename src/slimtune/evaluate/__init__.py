"""Evaluation: held-out loss / KL (`heldout`), the `slimtune eval` suite, style metrics, compare, report."""
