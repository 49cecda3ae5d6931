"""Shipping a tuned model: merge into a standalone checkpoint (`merge`), export to GGUF."""
