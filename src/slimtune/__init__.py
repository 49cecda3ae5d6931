"""slimtune: lean supervised fine-tuning of small chat models."""

from .data.render import render_chat, render_prompt

__all__ = ["render_chat", "render_prompt"]
__version__ = "0.1.0"
