"""IAMA (inference-aware meta-alignment, arXiv 2602.01603): train a policy for the inference-time
procedure it will be served with, by giving GRPO the first variation of the non-linear objective.

- :mod:`vllm_av.iama.variation`: the first variation ``∂R_i/∂π`` of best-of-N and soft best-of-N,
  estimated on one prompt's group of completions, and its combination over criteria by ``∂g/∂R_i``.
"""
