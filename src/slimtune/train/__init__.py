"""Training: the one loop (`loop.train`), its objectives, optimizers, callbacks and checkpoints."""
