"""What the command-line tools share: argument types that refuse bad values with the option's name, the
device check, and the measurement setting's options.

Every tool validates all of its settings before it does any work (before a header, a progress bar
or a file): a bad value ends in argparse's one-line ``error:`` naming the option, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")


def parser_for(doc: str, spec=None) -> argparse.ArgumentParser:
    """An ArgumentParser whose help shows the module docstring as written (its usage examples included) and
    names the tool as it is run, ``python -m experiments.X``: from the module's ``__spec__`` when given, else
    from the running ``__main__`` module when that is an experiments tool."""
    if spec is None:
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        spec = main_spec if main_spec is not None and main_spec.name.startswith(f"{__package__}.") else None
    prog = f"python -m {spec.name}" if spec is not None else None
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def comma_list(item=str, choices=None):
    """An argument type for "a,b,c": each part converted by ``item`` and, with ``choices``, one of them."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"needs at least one comma-separated value, got {text!r}")
        values = [item(part) for part in parts]
        if choices is not None:
            unknown = [value for value in values if value not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown value(s) {', '.join(map(repr, unknown))}; choose from {', '.join(map(str, choices))}"
                )
        return values

    parse.__name__ = "comma-separated list"  # argparse names the type in its messages
    return parse


def cuda_missing_reason() -> str:
    """Why torch sees no CUDA device, in a few words."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def check_device(parser: argparse.ArgumentParser, device: str, option: str = "--device") -> None:
    """``parser.error`` when ``device`` is cuda and none is available."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"{option} cuda: no CUDA device here ({cuda_missing_reason()}); use {option} cpu")


def require_cuda(parser: argparse.ArgumentParser, what: str) -> None:
    """``parser.error`` for tools that only run on a GPU."""
    import torch

    if not torch.cuda.is_available():
        parser.error(f"{what} needs a CUDA device ({cuda_missing_reason()}); run it on the GPU machine")


def check_output_stem(parser: argparse.ArgumentParser, stem: str | None, option: str = "--out") -> None:
    """The folder of an output stem (or file path) must exist or be creatable: it is created here, before any
    work, so that a bad path fails now rather than after a long measurement."""
    if stem is None:
        return
    folder = os.path.dirname(os.path.abspath(stem))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        parser.error(f"{option} {stem}: cannot create the folder {folder} ({error.strerror})")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option} {stem}: cannot write in {folder}")


# ------------------------------------------------------------------------------------------------
# The measurement setting (sweep_memory, sweep_throughput)
# ------------------------------------------------------------------------------------------------


def add_setting_arguments(
    parser: argparse.ArgumentParser, *, methods, default_methods, default_patterns, default_seq_lens
) -> None:
    """Shapes, dtype, dilation, block size, backend, head mode, work size; methods, patterns and N."""
    from optimized import BACKENDS
    from reference.config import HEAD_MODES, PATTERN_TYPES

    from .settings import SEED_RATES

    parser.add_argument("--device", default="cpu", choices=DEVICES, help="default cpu")
    parser.add_argument("--methods", nargs="+", default=list(default_methods), choices=list(methods))
    parser.add_argument("--patterns", nargs="+", default=list(default_patterns), choices=list(PATTERN_TYPES))
    parser.add_argument("--seq-lens", nargs="+", type=positive_int, default=list(default_seq_lens))
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--segments",
        nargs="+",
        type=positive_int,
        default=[256, 512, 1024],
        help="segment lengths (default: the seed's [2048, 4096, 8192] / 8)",
    )
    parser.add_argument(
        "--rates", nargs="+", type=positive_int, default=list(SEED_RATES), help="dilation rates, one per segment length"
    )
    parser.add_argument("--block-size", type=positive_int, default=16, help="default: the seed's 128 / 8")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS), help="the optimized methods' backend")
    parser.add_argument(
        "--head-mode",
        default="split",
        choices=list(HEAD_MODES),
        help="split: each head one branch; all: every head every branch (merged)",
    )
    parser.add_argument(
        "--work-size",
        type=positive_int,
        default=4096,
        help="blocks the torch backend and the weights process at once (the module's default 4096)",
    )


def setting_from_args(parser: argparse.ArgumentParser, args):
    """The MemorySetting of the parsed options, or ``parser.error`` naming the option that does not fit."""
    from .settings import MemorySetting, pattern_config

    check_device(parser, args.device)
    if len(args.rates) != len(args.segments):
        parser.error(
            f"--rates: {len(args.rates)} rate(s) for {len(args.segments)} segment length(s) in "
            f"--segments; give one rate per segment length"
        )
    if args.head_mode == "split" and args.heads < len(args.segments):
        parser.error(
            f"--heads {args.heads}: head mode 'split' gives each of the {len(args.segments)} branches "
            f"at least one head; give --heads >= {len(args.segments)} or --head-mode all"
        )
    setting = MemorySetting(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        segment_lengths=tuple(args.segments),
        dilation_rates=tuple(args.rates),
        block_size=args.block_size,
        backend=args.backend,
        work_size=args.work_size,
        head_mode=args.head_mode,
    )
    try:
        setting.geometry(min(args.seq_lens))
    except (TypeError, ValueError) as error:
        parser.error(f"--segments/--rates/--heads: {error}")
    for pattern in args.patterns:
        try:
            pattern_config(pattern, setting)
        except (TypeError, ValueError) as error:
            parser.error(f"--patterns {pattern} with --block-size {args.block_size}: {error}")
    return setting
