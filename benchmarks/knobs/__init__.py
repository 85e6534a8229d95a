"""Preference knobs (issue 6): the AV paper's experiments, reproduced small and end to end on CPU.

``python -m benchmarks.knobs.run [--quick] --out DIR`` runs the pipeline:

- ``data``: synthetic persona-style queries (medical, legal, financial), three responses each
  (avoidance, generic, expert) and the deterministic level classifier;
- ``train``: a byte-level BPE tokenizer and a tiny Llama trained from scratch on all levels,
  then a compact DPO per (domain, level) → aligned checkpoints;
- ``evaluate``: serving through vLLM with the vllm-av plugin (many mixes per batch), the
  merged-weights oracle check, KL divergences;
- ``run``: the driver (λ sweeps, multidomain reachability vs retraining, prompt baseline,
  compression), JSON + plots.
"""
