"""vllm-av: serve Alignment Vectors as per-request mixes of low-rank weight deltas in vLLM."""

__version__ = "0.1.0"
