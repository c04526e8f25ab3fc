"""What evaluates a model or a run: perplexity, zero-shot task accuracy (lm-evaluation-harness), the
report of where a quantization run's error went, and the model card that carries both beside a
checkpoint.
"""
