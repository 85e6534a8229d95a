"""Triton kernels of vllm-av, installed as the subpackage ``vllm_av.kernels``."""
