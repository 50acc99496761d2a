"""Algorithm layer: data, noise injection, the training loop, LiNC and metrics.

Plain arrays in, plain arrays out; torch only inside the training loop.
"""
