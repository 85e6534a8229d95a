"""The ``vllm.general_plugins`` entry point: wires AV serving into vLLM in every process.

``register()`` is re-entrant (vLLM calls it in the API server, the engine core and every
worker; forked children inherit the patches). It adds ``--enable-av`` and friends to vLLM's
engine arguments (:mod:`.cli_flags`), shapes the engine configuration (:mod:`.engine_config`),
and installs the frontend (:mod:`.frontend`), runner and layer hooks (:mod:`.worker`). Nothing
changes unless a run has ``additional_config["av"]``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.av")

_registered = False


def register() -> None:
    """Entry point: install the AV hooks into vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_av.serving import cli_flags, engine_config, frontend
    from vllm_av.serving.patch_points import unsupported_reason
    from vllm_av.serving.worker import layer_hooks, runner_hooks

    cli_flags.install()
    reason = unsupported_reason()
    if reason:
        logger.warning("vllm-av: AV serving disabled: %s", reason)
        return
    engine_config.install()
    frontend.install()
    runner_hooks.install()
    layer_hooks.install()
