"""Training: the one loop (`loop.train`), its objectives, optimizers, callbacks, checkpoints and its
own evaluation (held-out metrics, cached base states)."""
