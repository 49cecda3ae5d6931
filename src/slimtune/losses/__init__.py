"""Pure loss functions from hidden states at trained positions; no training state, no model.

    head.py        the output layer once: projection, logit transforms, shape checks, the chunk loop
    sft.py         chunked CE and KL / JSD to a reference (KL-anchored SFT, distillation)
    preference.py  chunked per-token log-probs; DPO, IPO, ORPO, SimPO, KTO on sequence log-probs
    distill.py     CE + divergence from a stored teacher's top-k log-probs (online: sft.py)
    grpo.py        group advantages, the completion mask, the clipped GRPO / Dr. GRPO / DAPO / BNPO loss
"""
