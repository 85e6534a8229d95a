"""Kernels of vllm-av -- Triton on CUDA (`blend`), C on CPU (`cpu`) -- installed as ``vllm_av.kernels``."""
