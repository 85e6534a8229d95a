"""Request admission (API server / offline ``LLM`` process): admit requests' mixes and RE-Control settings.

Every request passes ``InputProcessor.process_inputs`` before it reaches the engine, on the
OpenAI server and offline alike. There the ``av`` entry of ``SamplingParams.extra_args``
(from ``vllm_xargs`` or set directly) is validated -- a bad mix raises vLLM's validation
error, which the server answers with HTTP 400 -- and replaced by its canonical form, and the
request gets a prefix-cache salt per canonical mix so KV blocks computed under one mix are
never reused under another.

Beam search builds its own sampling parameters without ``extra_args``, so a mix there would
be silently dropped: such requests are refused with HTTP 400 instead.

A request's RE-Control setting (``recontrol``, ``recontrol_alpha``, ``recontrol_steps``;
:mod:`.recontrol`) is validated and canonicalised the same way. It needs no salt: steering
changes which tokens are sampled, never the KV computed for a given token sequence.

What a front serves (:class:`~vllm_av.serving.front.served.ServedLibrary`) is built with vLLM's
``InputProcessor`` and kept by :mod:`.served`; the HTTP routes are in :mod:`.http`.
"""

from __future__ import annotations

import logging

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.front.mix import MixError, mix_to_str, parse_mix
from vllm_av.serving.front.recontrol import RecontrolError, parse_recontrol
from vllm_av.serving.front.served import ServedLibrary, serve_for, served_by
from vllm_av.serving.library.avs import library_for, local_model_dir
from vllm_av.serving.library.values import value_library_for
from vllm_av.serving.protocol import ALPHA_KEY, MIX_KEY, RECONTROL_KEY, RECONTROL_KEYS, STEPS_KEY, VERSIONS_KEY
from vllm_av.serving.settings.config import av_config_from

logger = logging.getLogger("vllm.av")


class AVMixRejected(points.VALIDATION_ERROR.get(), ValueError):
    """A request's AV mix was rejected: HTTP 400 on the server, a ``ValueError`` offline."""


def admit(params, served: ServedLibrary | None) -> tuple:
    """The canonical mix of ``params`` (empty for none); raise ``MixError`` for a bad one."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, dict) or MIX_KEY not in extra:
        return ()
    if served is None:
        raise MixError("this server does not serve AVs (start it with --enable-av --av-path DIR)")
    mix = parse_mix(extra[MIX_KEY], served.names | served.updating, served.config)
    for name, _ in mix:
        if name in served.updating:
            raise MixError(f"av {name!r} is being loaded, replaced or unloaded right now; retry")
    return mix


def admit_recontrol(params, served: ServedLibrary | None):
    """The canonical RE-Control setting of ``params`` (None: off); raise ``RecontrolError`` for a bad one."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, dict) or not any(key in extra for key in RECONTROL_KEYS):
        return None
    if served is None or not served.value_functions:
        raise RecontrolError("this server serves no RE-Control value functions (start it with --enable-av --av-path DIR "
                       "--av-recontrol-path DIR)")
    return parse_recontrol(extra, served.value_names, served.config)


def canonicalise(extra: dict, mix: tuple, setting, served: ServedLibrary | None) -> str | None:
    """Leave the canonical mix and RE-Control setting in ``extra``; the prefix-cache salt for the mix.

    The salt names each AV's files digest, so KV computed with other weights under the same name
    (an AV replaced at runtime, or a library changed between runs) is never reused. With runtime
    updates the digests also travel in ``extra`` for the engine core's check (:mod:`vllm_av.serving.engine.updates`).
    """
    salt = None
    if MIX_KEY in extra:
        if mix:
            extra[MIX_KEY] = [list(pair) for pair in mix]
            digests = {name: served.digests.get(name, "") for name, _ in mix}
            salt = f"av:{mix_to_str(mix)}|{','.join(digests.values())}"
            if served.config.allow_runtime_updates:
                extra[VERSIONS_KEY] = digests
        else:
            del extra[MIX_KEY]
    for key in (ALPHA_KEY, STEPS_KEY, RECONTROL_KEY):
        extra.pop(key, None)
    if setting is not None:
        extra[RECONTROL_KEY] = list(setting)
    return salt


def _install_input_processor() -> None:
    original_init = points.INPUT_PROCESSOR_INIT.get()
    original_process = points.PROCESS_INPUTS.get()

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        config = av_config_from(vllm_config.additional_config)
        served = None
        if config is not None:
            model_dir = local_model_dir(vllm_config.model_config.model)
            entries = library_for(config, model_dir)
            served = ServedLibrary(config, entries, value_library_for(config, model_dir), model_dir)
        serve_for(self, served)

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        served = served_by(self)
        try:
            mix = admit(params, served)
        except MixError as exc:
            raise AVMixRejected(str(exc), parameter="vllm_xargs.av") from None
        try:
            setting = admit_recontrol(params, served)
        except RecontrolError as exc:
            raise AVMixRejected(str(exc), parameter=f"vllm_xargs.{RECONTROL_KEY}") from None
        # vLLM's engines pass lora_request by keyword.
        if served is not None and not served.config.stock_lora and kwargs.get("lora_request") is not None:
            raise AVMixRejected("this server serves AVs only; start it with --enable-lora to serve LoRA adapters too",
                                parameter="lora_request")
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        sampling = request.sampling_params
        if sampling is not None and isinstance(sampling.extra_args, dict):
            salt = canonicalise(sampling.extra_args, mix, setting, served)
            if salt:
                request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    points.INPUT_PROCESSOR_INIT.replace(__init__)
    points.PROCESS_INPUTS.replace(process_inputs)


def _install_beam_search_guard() -> None:
    """Refuse ``use_beam_search`` with an ``av`` mix or RE-Control (beam search would drop them)."""
    for point in (points.COMPLETION_BEAM_SEARCH, points.CHAT_BEAM_SEARCH):
        original = point.get()

        def to_beam_search_params(self, *args, _original=original, **kwargs):
            for key in (MIX_KEY, *RECONTROL_KEYS):
                if self.vllm_xargs and key in self.vllm_xargs:
                    what = "av mixes" if key == MIX_KEY else "RE-Control"
                    raise AVMixRejected(f"{what} cannot be used with beam search (use_beam_search)",
                                        parameter=f"vllm_xargs.{key}")
            return _original(self, *args, **kwargs)

        point.replace(to_beam_search_params)


def install() -> None:
    """Install the request-admission hooks and the AV routes (idempotent via plugin.register)."""
    from vllm_av.serving.front import http

    _install_input_processor()
    _install_beam_search_guard()
    http.install()
