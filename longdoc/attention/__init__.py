"""Attention for long prompts: exact kernels with log-sum-exp, Dual Chunk Attention, model install."""
