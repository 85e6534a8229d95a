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
    """Entry point: install the AV hooks into vLLM (idempotent).

    Where AV serving cannot work -- a vLLM release vllm-av does not support, or a hook that fails
    to install -- nothing is served without the AVs asked for: a start with AV on fails with one
    line naming the version and the supported ones, and a request carrying a mix is refused.
    """
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_av.serving.compat import version
    from vllm_av.serving.engine import config as engine_config
    from vllm_av.serving.engine import updates as engine_updates
    from vllm_av.serving.front import admission
    from vllm_av.serving.settings import cli_flags
    from vllm_av.serving.worker import layer_hooks, runner_hooks

    reason = version.unsupported_reason()
    steps = [("command-line flags", cli_flags.install), ("request admission", admission.install)]
    if reason is None:
        steps += [("engine configuration", engine_config.install), ("runtime updates", engine_updates.install),
                  ("runner hooks", runner_hooks.install),
                  ("layer hooks", layer_hooks.install)]
    for what, install in steps:
        try:
            install()
        except Exception as exc:  # an unknown vLLM: say which hook, never serve without AVs
            installed = version.installed_vllm()
            found = f"vllm {installed[1]}" if installed else "this vLLM"
            failure = (f"vllm-av could not install its {what} into {found} ({type(exc).__name__}: {exc}); "
                       f"it supports {version.supported_text()}")
            logger.error("vllm-av: %s", failure)
            reason = reason or failure
    if reason:
        logger.warning("vllm-av: AV serving unavailable: %s", reason)
        try:
            engine_config.install_refusal(reason)
        except Exception as exc:
            logger.error("vllm-av: could not install the refusal of AV starts (%s: %s)", type(exc).__name__, exc)
