"""What evaluates a model or a run: perplexity, zero-shot task accuracy (lm-evaluation-harness), and the
report of where a quantization run's error went.
"""
