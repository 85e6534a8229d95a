"""RE-Control (arXiv 2406.05954): value-guided editing of the last hidden state at decode time.

- :mod:`vllm_av.recontrol.value`: the value function (a ReLU MLP on the post-norm last-layer
  hidden state), its closed-form input gradient, the batched per-row steering loop, and the TD
  objective it is trained with.
"""
