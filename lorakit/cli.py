"""The `lorakit` command line: train, merge, convert, combine, generate, chat, eval, inspect.

User mistakes (`UserError`) print one `error: ...` line and exit 2; anything else is a bug and
exits 1 with its traceback. Each subcommand's work lives in its own module; this file only
parses arguments and dispatches.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from typing import Callable, NoReturn, Optional

from lorakit.errors import UserError, disk_full


def _quiet_libraries() -> None:
    # bitsandbytes logs a warning about an optional kernels package on every import; it is noise here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def _positive_int(text: str) -> int:
    """argparse type of counts that must be >= 1 (argparse reports the bad value, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give a number >= 1")
    return value


def _train(args: argparse.Namespace) -> int:
    from lorakit.train import train_command

    return train_command(args)


def _merge(args: argparse.Namespace) -> int:
    from lorakit.merge import merge_command

    return merge_command(args)


def _convert(args: argparse.Namespace) -> int:
    from lorakit.merge import convert_command

    return convert_command(args)


def _combine(args: argparse.Namespace) -> int:
    from lorakit.combine import combine_command

    return combine_command(args)


def _generate(args: argparse.Namespace) -> int:
    from lorakit.generate import generate_command

    return generate_command(args)


def _chat(args: argparse.Namespace) -> int:
    from lorakit.generate import chat_command

    return chat_command(args)


def _eval(args: argparse.Namespace) -> int:
    from lorakit.evaluate import eval_command

    return eval_command(args)


def _inspect(args: argparse.Namespace) -> int:
    from lorakit.inspection import inspect_command

    return inspect_command(args)


def _add_loading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["none", "nf4"], default="none",
                   help="nf4: the base in 4-bit as QLoRA trains it (a QLoRA adapter runs over the base it learned on)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                   help="compute dtype (default: on CPU fp32, a bf16 model bf16 where the CPU computes in bf16; on a GPU, "
                        "and with --quantize nf4, auto, as training's "
                        "precision: auto); set it to a run's train.precision to reproduce its numbers")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model folder's own code where its config or tokenizer needs it (only for a folder you "
                        "trust: the code runs with your rights)")


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes said as the CLI's other user errors are: one `error:` line, exit 2 (the
    usage is --help's to print), with the command that took the argument named."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit", description="LoRA and QLoRA fine-tuning for causal language models.")
    parser.add_argument("--version", action="version", version=_versions(), help="print the versions of lorakit, "
                        "torch and transformers (for a bug report) and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = sub.choices  # each command's parser, by name

    p = sub.add_parser("train", help="fine-tune a LoRA adapter from a YAML config (no config: the offline demo)")
    p.add_argument("config", nargs="?", help="YAML run config; omit to run the shipped demo")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=20 lora.r=8")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--nproc", type=int, default=None, help="launch torchrun with N processes on this machine")
    p.add_argument("--dry-run", action="store_true", help="check the config, data and model (no weights read) and "
                   "print the plan; trains nothing")  # fmt: skip
    p.add_argument("--show-examples", type=int, default=0, metavar="N", help="with --dry-run: print the first N "
                   "training examples as the model reads them, the trained tokens marked")  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser("merge", help="merge an adapter into its base and write a plain model folder")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--adapter", required=True, help="adapter folder (lorakit or PEFT)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the base model's dtype")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 500MB, 2GB")
    p.add_argument("--simulate-nf4", action="store_true", help="merge into the NF4-rounded base the adapter was trained on")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_merge)

    p = sub.add_parser("convert", help="write a PiSSA / OLoRA adapter as a plain LoRA adapter (rank 2r) over the unchanged base")
    p.add_argument("--base", required=True, help="base model folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="PiSSA or OLoRA adapter folder (lorakit or PEFT)")
    p.add_argument("--out", required=True, help="output adapter folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_convert)

    p = sub.add_parser("combine", help="combine several adapters of one base into one adapter (PEFT's add_weighted_adapter)")
    p.add_argument("--adapter", required=True, action="append", help="an adapter folder; repeat for each adapter")
    p.add_argument("--out", required=True, help="output adapter folder")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter, in order (default 1 each)")
    p.add_argument("--method", default="cat", help="cat (exact; rank: the sum of ranks), svd (rank --rank), or ties_svd, "
                   "dare_linear_svd, dare_ties_svd, magnitude_prune_svd (prune with --density first)")  # fmt: skip
    p.add_argument("--rank", type=int, default=None, help="rank of the svd methods' result (default: the largest adapter rank)")
    p.add_argument("--density", type=float, default=None, help="share of each update the pruning methods keep, in (0, 1]")
    p.add_argument("--majority-sign", choices=["total", "frequency"], default="total", help="TIES' sign election")
    p.add_argument("--seed", type=int, default=0, help="DARE's random pruning seed")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_combine)

    for name, func, help_text in (
        ("generate", _generate, "complete prompts with a model (and adapter)"),
        ("chat", _chat, "chat with a model (and adapter) in the terminal"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="model folder")
        p.add_argument("--adapter", default=None, help="adapter folder")
        _add_loading_options(p)
        if name == "generate":
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--prompt", help="one prompt")
            src.add_argument("--prompts", help="file of prompts (- for standard input): one per line, or JSONL with a "
                                                "'prompt' field, or 'messages' (and 'tools') for chat")  # fmt: skip
            p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
            p.add_argument("--system", default=None, metavar="TEXT",
                           help="a system message put first in chat prompts that have none (data.system_prompt of the run)")
            p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts generated together (default 8)")
        else:
            p.add_argument("--system", default=None, metavar="TEXT", help="a system message first in the conversation")
        p.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens a reply may have (default 256)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); sampling above it")
        p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass, in (0, 1] (default 1: off)")
        p.add_argument("--top-k", type=int, default=0, help="sampling: the k likeliest tokens only (default 0: off)")
        p.add_argument("--seed", type=int, default=0, help="sampling: the random seed (default 0)")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="loss, perplexity and exact-match accuracy (DPO reward accuracy) on a dataset")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--adapter", default=None, help="adapter folder")
    _add_loading_options(p)
    p.add_argument("--data", required=True, help="records in any lorakit format: .jsonl, .json, .parquet, .arrow, .csv or .tsv")
    p.add_argument("--generate", action="store_true", help="also measure exact-match accuracy of greedy completions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default: the adapter's run's data.max_length, else 1024, or the model's "
                        "positions if fewer)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="examples (or pairs) a forward (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="--generate: the most tokens an answer may have (default 64)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records (counted in the result) instead of stopping")
    p.add_argument("--column", action="append", default=[], metavar="KEY=NAME",
                   help="the records' NAME for lorakit's KEY, e.g. --column prompt=question (data.columns); repeatable")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message put first in chats that have none (data.system_prompt of the run)")
    p.add_argument("--train-turns", choices=["all", "last"], default=None,
                   help="chats: score every assistant turn or the last (data.train_turns; default: the adapter's run's, else all)")
    p.add_argument("--train-on-inputs", choices=["true", "false"], default=None,
                   help="score the prompt tokens too (data.train_on_inputs; default: the adapter's run's, else false)")
    p.add_argument("--too-long", choices=["truncate", "drop"], default=None,
                   help="examples longer than --max-length (data.too_long; default: the adapter's run's, else truncate)")
    p.add_argument("--objective", choices=["dpo", "ipo", "simpo", "orpo", "kto"], default=None,
                   help="read the data as preference pairs (kto: labelled examples) and report this objective's loss and "
                        "rewards (default: dpo for preference pairs, kto for labelled examples; dpo, ipo, kto: the adapter against its base)")
    p.add_argument("--reference-adapter", default=None,
                   help="preference data, dpo / ipo / kto: the reference is this adapter (the one a run's `adapter` continued), "
                        "not the base")
    p.add_argument("--beta", type=float, default=None, help="preference data: the objective's beta (default: its usual value)")
    p.add_argument("--simpo-gamma", type=float, default=0.5, help="preference data: SimPO's target reward margin")
    p.add_argument("--kto-desirable-weight", type=float, default=1.0, help="kto: the desirable examples' loss weight")
    p.add_argument("--kto-undesirable-weight", type=float, default=1.0, help="kto: the undesirable examples' loss weight")
    p.set_defaults(func=_eval)

    p = sub.add_parser("inspect", help="summarise an adapter (and check it against a base model)")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--base", default=None, help="base model folder for a compatibility check and relative update sizes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_inspect)
    return parser


def _versions() -> str:
    """"lorakit 0.1.0 (torch 2.13.0+cpu, transformers 5.24.0)", read from the installed packages'
    metadata, so that asking for it imports neither."""
    from importlib import metadata

    from lorakit import __version__

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"lorakit {__version__} (torch {version('torch')}, transformers {version('transformers')})"


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]  # KEY=VALUE after a flag: `train run.yaml --dry-run lora.r=8`
    elif extra:  # said by the command's parser, which took the other arguments
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    terminate = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread() and terminate == signal.SIG_DFL:
        # SIGTERM (kill, a scheduler's stop) unwinds as Ctrl-C does, so that a half-written output's
        # staging folder is removed on the way out; `train` installs its own stop for its steps
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return int(func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        full = disk_full(exc)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if signal.getsignal(signal.SIGTERM) is _exit_on_signal:
            signal.signal(signal.SIGTERM, terminate)


def _exit_on_signal(signum: int, frame: object) -> NoReturn:
    # silently, as the default action is: torchrun stops the other workers with it when one fails.
    # Once only: should the exit be swallowed (raised inside a __del__ or an exit handler, where
    # Python prints and ignores it), the next SIGTERM ends the process outright.
    signal.signal(signum, signal.SIG_DFL)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
