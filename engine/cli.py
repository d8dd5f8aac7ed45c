"""The command line shared by the ``train_*.py`` scripts: arguments, config resolution, resume, error handling."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from utils.errors import user_errors_as_one_line

logger = logging.getLogger("engine")

REPO = Path(__file__).resolve().parents[1]  # recipes are named relative to it


def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"recipe YAML (default {default_config})")
    parser.add_argument("--output-dir", default=None, help="run directory (default: output_dir of the config)")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a last.pth; 'auto' takes <output-dir>/last.pth when it exists")
    parser.add_argument("--init-from", default=None, help="initialise from our or the authors' checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the test split and exit")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output-dir that holds a previous run: its files are moved "
                             "into <output-dir>/replaced/<time>/ first, so no record mixes two runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


# Exit status of a run stopped by a signal after saving last.pth: EX_TEMPFAIL, "try again later", so that a
# scheduler or wrapper can requeue it with --resume auto. Finished runs exit 0, failed ones 1.
EXIT_STOPPED = 75
# Exit status of a run ended because its step waited train.stall_stop_seconds for a batch (a stalled loader worker):
# EX_IOERR, the read never came back. last.pth is saved (single process); resume with --resume auto.
EXIT_STALLED = 74


def exit_status(summary: dict) -> int:
    """The process exit status for a run summary: 0 finished, EXIT_STOPPED stopped with last.pth saved.

    torchrun exits 1 whatever status its workers return, so local rank 0 also writes a stop's status into the
    file ``IVT_EXIT_STATUS_FILE`` names (start.sh sets it and exits with that status).
    """
    return report_status(EXIT_STOPPED if summary.get("stopped") else 0)


def report_status(status: int) -> int:
    """``status``, also written to the file IVT_EXIT_STATUS_FILE names (by local rank 0) when it is not 0."""
    report = os.environ.get("IVT_EXIT_STATUS_FILE")
    if status and report and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            Path(report).write_text(f"{status}\n")
        except OSError:  # the run is saved; only the wrapper's exit status is at stake
            logger.warning("could not write the exit status to %s", report)
    return status


def refuse_previous_run(output_dir: Path, resuming: Path | None = None) -> None:
    """A new run, or a run resumed from another folder's checkpoint, must not overwrite the checkpoints of the run
    in ``output_dir`` unless asked to; the message says how to continue what is there."""
    from engine.checkpoints import selection_record
    from utils.checkpoint import CheckpointError

    found = [name for name in ("last.pth", "best.pth") if (output_dir / name).is_file()]
    if not found:
        return
    refuse_running(output_dir)
    if resuming is not None:
        raise CheckpointError(f"{output_dir} holds another run's {' and '.join(found)}; resuming {resuming} there "
                              "would replace them: choose another --output-dir, or pass --overwrite to replace them")
    if found == ["best.pth"]:
        try:
            saved = f" (saved after epoch {selection_record(output_dir / 'best.pth')['best_epoch']})"
        except Exception:  # an unreadable best.pth: the advice stands, the resume will name the damage
            saved = ""
        raise CheckpointError(f"{output_dir} holds a previous run's best.pth but no last.pth (the run stopped inside "
                              "its first save of last.pth, or last.pth was deleted); best.pth is a whole checkpoint"
                              f"{saved}: continue from it with --resume {output_dir / 'best.pth'}, choose another "
                              "--output-dir, or pass --overwrite to start over")
    raise CheckpointError(f"{output_dir} holds a previous run's {' and '.join(found)}; continue it with "
                          "--resume auto, choose another --output-dir, or pass --overwrite to start over")


def refuse_running(output_dir: Path) -> None:
    """RunFolderBusyError when a live run holds ``output_dir``: whatever its files say (a best.pth without last.pth
    is also what a run inside its first save of last.pth looks like), that run is still running."""
    from utils.run_lock import RunFolderBusyError, RunFolderLock

    holder = RunFolderLock(output_dir).holder()
    if holder is not None:
        raise RunFolderBusyError(f"{output_dir} is in use by {holder}: that run is still running (it may be saving "
                                 "a checkpoint); wait for it to end (or stop it), then continue it with --resume auto, "
                                 "or choose another --output-dir")


@user_errors_as_one_line()
def train_main(argv: Sequence[str] | None, doc: str, default_config: str) -> dict:
    """The whole main() of a train_*.py script: ``doc`` is its docstring (the first line describes it in --help),
    ``default_config`` its recipe relative to the repository. A user mistake exits with one line, a bug with its
    traceback; returns the run summary (see engine.training.summary)."""
    default_config = str(REPO / default_config)
    # Intermixed: key=value overrides may stand before and after options (train.epochs=3 --resume auto lr=...).
    args = build_parser(doc.splitlines()[0], default_config).parse_intermixed_args(argv)
    # Heavy imports after argument parsing, so that --help answers at once.
    from engine.checkpoints import resolve_resume
    from engine.training import WorkerStalledError, train
    from utils import distributed as du
    from utils.checkpoint import check_writable_folder, load_file
    from utils.config import config_from_dict, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        output_dir = Path(args.output_dir or cfg.output_dir)
        check_writable_folder(output_dir, "--output-dir")  # before anything is read or trained
        refuse_running(output_dir)
        resume_path = resolve_resume(args.resume, output_dir)
        if resume_path is None and not (args.eval_only or args.overwrite):
            refuse_previous_run(output_dir)
        elif (resume_path is not None and not args.overwrite
              and resume_path.parent.resolve() != output_dir.resolve()):  # another run's checkpoint
            refuse_previous_run(output_dir, resuming=resume_path)
        resume_obj = load_file(resume_path) if resume_path is not None else None
        if resume_obj is not None:
            # A resumed run keeps the configuration it started with; overrides still apply on top.
            cfg = config_from_dict(resume_obj["config"], args.overrides, source=str(resume_path))
            if args.config != default_config:
                logger.warning("--config %s is ignored: a resumed run keeps the config stored in %s",
                               args.config, resume_path)
        cfg = cfg.replace([f"output_dir={output_dir}"])
        # --overwrite sets the previous run's files aside, unless this run continues them (a resume from this folder)
        fresh = args.overwrite and not args.eval_only and (
            resume_path is None or resume_path.parent.resolve() != output_dir.resolve())
        return train(cfg, output_dir=output_dir, resume=resume_path, resume_obj=resume_obj,
                     init_from=args.init_from, eval_only=args.eval_only, set_aside_previous=fresh)
    except WorkerStalledError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        raise SystemExit(report_status(EXIT_STALLED)) from None
    finally:
        du.cleanup_distributed()
