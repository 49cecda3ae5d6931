"""Training: the one loop (`loop.train`), its objectives, optimizers, callbacks and checkpoints."""
from . import objectives  # noqa: F401  first, so the objective modules it registers can import its base class
