"""The `megatron-prune` command: parse arguments, run the verb. Verbs, their options and the pipeline function
each calls are defined once, in pipelines/verbs.py; this module builds the parsers from that table.

Every subcommand runs the same way as a single process, under `torchrun`, or under Slurm's `srun`;
--tp/--pp choose the model-parallel layout and the remaining ranks are data-parallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

EXAMPLES = """\
examples:
  megatron-prune demo                                   # SmolLM2-135M: convert, score, prune, evaluate
  megatron-prune convert model.gguf ckpts/smol --tp 1   # GGUF -> Megatron distributed checkpoint
  megatron-prune convert hf_dir/ ckpts/llama --tp 2     # Hugging Face -> Megatron (run with torchrun -n 2)
  megatron-prune convert ckpts/llama hf_out/            # Megatron -> Hugging Face
  megatron-prune data --corpus shakespeare --tokenizer ckpts/smol --out data/
  megatron-prune eval ckpts/smol --data data/shakespeare_valid --seq-len 512
  megatron-prune importance ckpts/smol --data data/shakespeare_train --out smol.scores
  megatron-prune prune ckpts/smol --scores smol.scores --target hidden=448,ffn=1024 --out ckpts/smol-w
  megatron-prune prune ckpts/smol --scores smol.scores --target layers=24,depth_metric=angular --out ckpts/smol-d
"""


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per verb of pipelines/verbs.py, its options as defined there."""
    from megatron_prune.pipelines.verbs import VERBS

    parser = argparse.ArgumentParser(
        prog="megatron-prune",
        description="Prune and distill Megatron-core LLMs directly on their tensor/pipeline-parallel shards. "
        "Run any subcommand as one process, with torchrun (--nproc-per-node = TP*PP*DP) or with srun.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS.values():
        p = sub.add_parser(verb.name, help=verb.help, description=verb.description)
        for option in verb.cli_options():
            option.add_to(p)
            action = p._actions[-1]  # every option's --help shows its default
            if (action.option_strings and action.help and action.default not in (None, False, argparse.SUPPRESS)
                    and "default" not in action.help):
                action.help = f"{action.help} (default %(default)s)"
    return parser


def _print_json(obj) -> None:
    from megatron_prune.runtime import log0

    log0(json.dumps(obj, indent=2))


def _request_stage_split(args: argparse.Namespace) -> None:
    """--decoder-first/last-pipeline-num-layers: checked (before any model is read) and kept for the pipelines."""
    from megatron_prune import inputs
    from megatron_prune.runtime.stages import FIRST_FLAG, LAST_FLAG, request_split

    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    if first is not None or last is not None:
        inputs.stage_override(first, last, getattr(args, "pp", 1))
        if args.command == "search":
            raise inputs.InputError(f"{FIRST_FLAG} / {LAST_FLAG}: search writes candidates of many depths, each "
                                    f"of which takes its automatic split; drop the flag")
    request_split(first, last)


def run(args: argparse.Namespace) -> None:
    """Run the verb with the parsed options; print its result (if any) as JSON."""
    from megatron_prune.pipelines.verbs import VERBS

    _request_stage_split(args)
    verb = VERBS[args.command]
    result = verb.run({o.name: getattr(args, o.name) for o in verb.cli_options()})
    if result is not None:
        _print_json(result)


# megatron-core's own warnings, each matched by its text (docs/distillation.md, "Quiet output"). None is about
# anything the user did or can change: megatron warns at import about every optional accelerator library that is
# absent (we use its torch fallbacks on purpose), about its own default cuda_graph_scope, and its torch_dist
# checkpoint format calls torch's deprecated ShardedTensor and load_state_dict. Everything else still shows.
MEGATRON_NOISE = (
    (UserWarning, r"megatron\.core", r"(Transformer Engine and Apex are|Apex is) not installed"),
    (UserWarning, r"megatron\.core", r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)"),
    (UserWarning, r"megatron\.core", r"MimoModelConfig is experimental"),  # 0.19, at import
    (UserWarning, r"megatron\.core", r"Could not determine rank from torch\.distributed"),  # 0.19, before init
    # torch's distributed checkpoint, called by megatron-core 0.19 on a single process / with its own argument order
    (UserWarning, r"torch\.distributed\.checkpoint", r"torch\.distributed is disabled, unavailable or uninitialized"),
    (UserWarning, r"torch\.distributed\.checkpoint", r"The argument order of load has been changed"),
    (FutureWarning, r"megatron\.core", r"`load_state_dict` is deprecated and will be removed"),
    (FutureWarning, r"", r"Please use DTensor instead and we are deprecating ShardedTensor"),
)


# Exceptions that mean a bug of ours, e.g. a TypeError deep in a recipe stage (its options were checked against
# the verb before it ran). Anything else unexpected (a RuntimeError of torch or NCCL, ...) keeps its traceback.
BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


def quiet_megatron() -> None:
    for category, module, message in MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_megatron()
    # torch's CUDA wheel (what PyPI serves for Python 3.12) on a machine without a GPU logs 'No CUDA runtime is
    # found' at import; the CPU layer runs it on the CPU, so the warning is noise on every command's stderr
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    from megatron_prune.arch import ArchError
    from megatron_prune.checkpoint import CheckpointError
    from megatron_prune.runtime import destroy, is_rank0
    from megatron_prune.runtime.distributed import launch_rank
    from megatron_prune.runtime.progress import close_bars
    from megatron_prune.runtime.stop import EXIT_STOPPED, StopRequested, write_stop_marker

    try:
        run(args)
    except StopRequested as e:  # SIGTERM/SIGINT/SIGUSR1: saved (or nothing written), see docs/distillation.md
        # A stop raised from the signal handler can interrupt a constructor (a tqdm bar, a dataset); the half-built
        # object's __del__ then fails when the traceback is freed. That is noise on the way out, not an error.
        sys.unraisablehook = lambda _unraisable: None
        if is_rank0():
            close_bars()
            print(f"megatron-prune {args.command}: {e}", file=sys.stderr, flush=True)
            write_stop_marker(f"megatron-prune {args.command}: {e}")
        return EXIT_STOPPED
    except (ArchError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        if not getattr(e, "rank0_only", False) or launch_rank() == 0:  # DeviceError: every rank, said once
            print(f"megatron-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BUGS as e:  # never a bad input (those are checked first): one line; --debug: the traceback
        if args.debug:
            raise
        print(f"megatron-prune {args.command}: internal error: {type(e).__name__}: {e} (run again with --debug "
              f"for the traceback)", file=sys.stderr)
        return 1
    finally:
        destroy()
        from megatron_prune.runtime.stages import request_split

        request_split()  # the stage-size flags were for this command only (main() may be called again in-process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
