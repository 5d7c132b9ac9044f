"""The ``beyond-icon`` command line.

Each task subcommand takes one option per field of its config dataclass (``--batch-size`` for
``batch_size``), an optional ``--config FILE.yaml`` whose values the options override, and
``--out DIR``, the run folder (config.yaml, metrics.json, history.csv, figures, checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from beyond_icon import __version__

__all__ = ["main"]


def _task_configs() -> dict[str, type]:
    from beyond_icon.tasks.cluster import ClusterConfig
    from beyond_icon.tasks.sne import SNEConfig
    from beyond_icon.tasks.supcon import SupConConfig

    return {"sne": SNEConfig, "supcon": SupConConfig, "cluster": ClusterConfig}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(annotation: str):
    """An argparse type for a dataclass field annotation (as a string)."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()
    if base.startswith("list["):
        inner = _converter(base[5:-1])

        def items(text: str) -> list:
            try:
                values = [inner(part) for part in text.split(",") if part.strip()]
            except (ValueError, argparse.ArgumentTypeError):
                values = []
            if not values:
                raise argparse.ArgumentTypeError(
                    f"expected a comma-separated list of {base[5:-1]}, got {text!r}"
                )
            return values

        return items
    simple = {"int": int, "float": float, "str": str, "bool": _parse_bool}[base]
    if not optional:
        return simple

    def maybe(text: str):
        return None if text.strip().lower() in ("none", "null", "") else simple(text)

    maybe.__name__ = base  # argparse's "invalid int value: ..." names the type
    return maybe


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of int, got {text!r}")
    return values


def _refuse(message: str):
    def convert(text: str):
        raise argparse.ArgumentTypeError(f"no longer an option: {message}")

    return convert


def _add_config_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    for old, message in config_cls.renamed.items():
        parser.add_argument(
            "--" + old.replace("_", "-"), type=_refuse(message), help=argparse.SUPPRESS
        )
    for field in dataclasses.fields(config_cls):
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()
        )
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{field.metadata.get('help', '')} (default: {shown})".strip()
        flag = "--" + field.name.replace("_", "-")
        if str(field.type) == "bool":
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
            continue
        parser.add_argument(
            flag,
            dest=field.name,
            type=_converter(str(field.type)),
            default=argparse.SUPPRESS,
            metavar=field.name.upper(),
            help=text,
        )


def _config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    from beyond_icon.tasks.common import config_from_dict

    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path} is not a file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"{path} is not valid YAML: {problem}{where}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config} must hold a mapping of option: value")
        task = loaded.pop("task", config_cls.task)
        if task != config_cls.task:
            raise ValueError(f"{args.config} configures task '{task}', not '{config_cls.task}'")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_dict(config_cls, values)


def _run_task(task: str, args: argparse.Namespace) -> int:
    import importlib

    config = _config_from_args(_task_configs()[task], args)
    module = importlib.import_module(f"beyond_icon.tasks.{task}")
    module.run(config, out=args.out, resume=args.resume, verbose=not args.quiet)
    from beyond_icon.distributed import is_main

    if is_main():
        print(f"wrote {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from beyond_icon.demo import run_demo

    run_demo(args.out, quick=args.quick, verbose=not args.quiet, jobs=args.jobs)
    return 0


def _split_list(text: str, kind=str) -> list:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def _sweep(args: argparse.Namespace) -> int:
    from beyond_icon import sweep

    config = _config_from_args(_task_configs()[args.sweep_task], args)
    options = {k: v for k, v in dataclasses.asdict(config).items()}
    divergences = _split_list(args.divergences)
    baselines = _split_list(getattr(args, "baselines", "") or "")
    if "pmi" in divergences:
        raise ValueError(
            "'pmi' is TEMI's loss, not a divergence: run it beside them with --baselines pmi"
        )
    unknown = sorted(set(baselines) - set(sweep.BASELINES.get(args.sweep_task, ())))
    if unknown:
        known = ", ".join(sweep.BASELINES.get(args.sweep_task, ())) or "none"
        raise ValueError(f"unknown {args.sweep_task} baseline(s) {unknown}; known: {known}")
    specs = sweep.plan(args.sweep_task, divergences + baselines, args.seeds, options, args.out)
    failed = sweep.run_sweep(specs, jobs=args.jobs, verbose=not args.quiet)
    if len(failed) == len(specs):  # nothing to report: say why, not "no finished run"
        raise ValueError(
            f"all {len(specs)} run(s) failed (the reasons above); fix the options and rerun "
            "the same command"
        )
    sweep.build_report(args.out, verbose=not args.quiet)
    print(f"wrote {args.out}/results.md")
    if failed:
        print(f"{len(failed)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from beyond_icon import sweep

    sweep.build_report(args.dir, verbose=not args.quiet)
    print(f"wrote {args.dir}/results.md")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from beyond_icon.extract import run_extract

    run_extract(
        args.encoder,
        args.data,
        args.out,
        data_dir=args.data_dir,
        download=args.download,
        batch_size=args.batch_size,
        device=args.device,
        image_size=args.image_size,
        pooling=args.pooling,
        crop=args.crop,
        num_workers=args.workers,
        chunk_batches=args.chunk_batches,
        skip_corrupt=args.skip_corrupt,
        verbose=not args.quiet,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyond-icon",
        description="Representation learning with the I-Con loss and any divergence.",
    )
    parser.add_argument("--version", action="version", version=f"beyond-icon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for task, config_cls in _task_configs().items():
        doc = (config_cls.__doc__ or "").strip().splitlines()[0]
        doc = re.sub(r":\w+:`~?([^`]*)`", r"\1", doc).replace("``", "")  # no reST in --help
        task_parser = sub.add_parser(task, help=doc, description=doc)
        task_parser.add_argument("--out", required=True, help="run folder to write")
        task_parser.add_argument("--config", help="YAML file of options (command-line options win)")
        task_parser.add_argument(
            "--resume", action="store_true", help="continue from --out's checkpoint"
        )
        task_parser.add_argument("--quiet", action="store_true", help="no progress output")
        _add_config_options(task_parser, config_cls)
        task_parser.set_defaults(handler=lambda args, task=task: _run_task(task, args))
    sweep_parser = sub.add_parser(
        "sweep", help="one task over divergences x seeds, resumable, one table"
    )
    sweep_tasks = sweep_parser.add_subparsers(dest="sweep_task", required=True)
    for task, config_cls in _task_configs().items():
        task_sweep = sweep_tasks.add_parser(task, help=f"sweep the {task} task")
        task_sweep.add_argument(
            "--divergences",
            default="kl,tv,jsd,hellinger",
            help="comma-separated divergence names",
        )
        if task in ("cluster",):
            task_sweep.add_argument(
                "--baselines",
                default="",
                help="other losses run beside the divergences, one row each: pmi (TEMI's)",
            )
        task_sweep.add_argument(
            "--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated seeds"
        )
        task_sweep.add_argument(
            "--jobs", type=_positive_int, default=1, help="runs in parallel processes"
        )
        task_sweep.add_argument("--out", required=True, help="sweep folder")
        task_sweep.add_argument("--config", help="YAML file of task options")
        task_sweep.add_argument("--quiet", action="store_true")
        _add_config_options(task_sweep, config_cls)
        task_sweep.set_defaults(handler=_sweep)
    report_parser = sub.add_parser(
        "report", help="rebuild a sweep's tables and figures from finished runs"
    )
    report_parser.add_argument("dir", help="sweep folder")
    report_parser.add_argument("--quiet", action="store_true")
    report_parser.set_defaults(handler=_report)
    extract = sub.add_parser(
        "extract",
        help="features of a dataset from a frozen encoder (a streamed folder, or one .npz)",
    )
    extract.add_argument(
        "--encoder",
        required=True,
        help="dinov2_vit{s,b,l,g}14 | dino_vit{s,b}16 | a Hugging Face model folder | "
        "module:factory | file.py:factory",
    )
    extract.add_argument("--data", required=True, help="dataset spec, e.g. imagefolder:PATH")
    extract.add_argument(
        "--out",
        required=True,
        help="features folder (streamed, resumable, memory-mapped), or FILE.npz (in memory)",
    )
    extract.add_argument("--data-dir")
    extract.add_argument("--download", action="store_true")
    extract.add_argument("--batch-size", type=int, default=256)
    extract.add_argument("--device", default="auto")
    extract.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side (default the encoder's own: 224 for DINO; a multiple of the patch size)",
    )
    extract.add_argument(
        "--pooling", choices=("cls", "mean"), default="cls", help="class token or mean of patches"
    )
    extract.add_argument(
        "--crop",
        type=float,
        default=0.875,
        help="image folders: resize the shorter side to size / crop, then centre-crop "
        "(0.875: the 256 -> 224 evaluation transform; 1: plain resize)",
    )
    extract.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default min(8, CPUs))"
    )
    extract.add_argument(
        "--chunk-batches",
        type=int,
        default=16,
        help="batches per chunk written to disk (the unit of resumption)",
    )
    extract.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out unreadable images with a warning instead of stopping",
    )
    extract.add_argument("--quiet", action="store_true")
    extract.set_defaults(handler=_extract)
    demo = sub.add_parser("demo", help="the paper in miniature on the bundled digits, one report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="fewer epochs (a smoke test)")
    demo.add_argument("--jobs", type=_positive_int, default=1, help="runs in parallel processes")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=_demo)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line (YAML and some library errors span several); the
    exception's name where the message alone would not say what went wrong."""
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, FileNotFoundError)) and text:
        return text
    if isinstance(error, SyntaxError) and error.filename:
        return f"syntax error in {error.filename}, line {error.lineno}: {error.msg}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import zipfile

    import yaml

    expected = (
        ValueError,
        TypeError,
        OSError,  # missing files, folders where files belong, unreadable images
        RuntimeError,
        ImportError,
        EOFError,
        SyntaxError,  # a --divergence-module with a syntax error
        zipfile.BadZipFile,  # a truncated .npz
        yaml.YAMLError,
    )
    succeeded = False
    try:
        code = args.handler(args)
        succeeded = code in (0, None)
        return code
    except expected as error:
        if args.debug:
            raise
        print(f"beyond-icon {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        command = getattr(args, "command", None)
        checkpointed = "a run is checkpointed after an epoch at most every 30 s and at its end"
        done = {
            "extract": "written chunks are kept; rerun the same command to continue",
            # a sweep resumes its runs by itself (it takes no --resume)
            "sweep": f"finished runs are kept and {checkpointed}; rerun the same command to go on",
            "demo": f"{checkpointed}; rerun the same command to go on",
        }.get(command, f"{checkpointed}; rerun with --resume to go on from its last checkpoint")
        print(f"\ninterrupted: {done}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group(together=succeeded)


def _leave_process_group(together: bool) -> None:
    """Under torchrun, leave the process group before the interpreter exits: a gloo group left
    to static destruction sometimes aborts the process ("terminate called without an active
    exception") after a successful run.

    After a success (``together``) the gloo ranks first wait for each other: a rank that left
    while rank 0 still evaluated aborted at exit in about 1 run of 8
    (``tests/test_distributed.py``). After an error or an interrupt a rank leaves at once, so
    that torchrun sees it fail and stops the others."""
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if together and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(days=1))  # any evaluation
    except RuntimeError as error:  # a peer failed after this rank's success: torchrun reports it
        print(f"beyond-icon: leaving without the other ranks: {_one_line(error)}", file=sys.stderr)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
