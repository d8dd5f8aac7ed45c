"""The training loop shared by every entry script, in named phases that read top-down.

:func:`train` sets up the process, reads the data, builds the model, prepares the optimisation, restores a
resumed run, runs the epochs and tests the selected model. One run directory holds ``config.yaml``,
``log.txt``, ``metrics.jsonl``, ``last.pth``, ``best.pth`` and the ``metrics_<split>.json`` files.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from datasets.batch_augment import augment_batch
from datasets.build import build_train_loader, set_train_epoch
from datasets.records import SplitError
from datasets.sampler import IdentitySampler, ShardedShuffleSampler
from datasets.workers import closing_workers, start_workers, worker_states
from engine.checkpoints import (TrainState, carry_best_over, check_finite_weights, checkpoint_state, initialise_weights,
                                load_model_state, read_checkpoint_or_folder, read_resume,
                                save_checkpoint)
from engine.data import build_run_tokenizer, load_data, run_caption_words, save_run_tokenizer
from engine.evaluation import evaluate_split, selection_ranking, selection_score
from engine.identity_neighbours import identity_neighbours
from models.ivt import build_model
from models.objectives import RetrievalObjective, itm_negatives_of, itm_objective_of
from utils import distributed as du
from utils.amp import autocast
from utils.checkpoint import CheckpointError, load_file, remove_orphan_temporaries, restore_rng_state
from utils.config import Config, ConfigError, save_config
from utils.environment import environment_record
from utils.errors import UserError
from utils.logging_utils import MetricsWriter, interactive, setup_logging
from utils.optim import (batch_scaling_message, build_optimizer, build_scheduler, renew_hyperparameters,
                         schedule_changes, set_schedule)
from utils.run_lock import RunFolderLock, set_aside_previous_run
from utils.task_plan import TaskPlan

logger = logging.getLogger("engine")


class NonFiniteLossError(UserError, RuntimeError):
    """A loss became NaN or infinite; the message names the loss and the steps."""


class WorkerStalledError(UserError, RuntimeError):
    """The training loop waited train.stall_stop_seconds for a batch: a loader worker (or the read it is in) hangs."""


class WorkerDiedError(UserError, RuntimeError):
    """A loader worker was killed (most often by the kernel's out-of-memory killer) or exited."""


class StoppedDuringTest(Exception):
    """A stop signal arrived during the final test; last.pth already holds the finished training."""


@dataclass
class Run:
    """Everything one training run holds, built by the phases of :func:`train`."""

    cfg: Config
    output_dir: Path
    device: torch.device
    model: torch.nn.Module
    objective: torch.nn.Module  # the model and the recipe's losses: what DDP wraps
    tokenizer: Any
    train_records: list
    eval_splits: Any
    train_module: torch.nn.Module | None = None
    loader: Any = None
    sampler: Any = None
    dataset: Any = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None
    nominal_steps: int = 0  # optimizer steps of epoch 0: the schedule's unit of progress
    selection: str | None = None  # the split that picks best.pth, None = the last epoch
    state: TrainState = field(default_factory=TrainState)
    writer: MetricsWriter | None = None
    caption_words: list[str] | None = None  # the training captions' words, saved in checkpoints (rank 0 only)
    neighbours_epoch: int = -1  # the epoch the sampler's identity neighbours were computed for (-1: none)
    plan: TaskPlan = field(init=False)  # what the task means: records, evaluation, batches; resolved once

    def __post_init__(self) -> None:
        self.plan = TaskPlan.from_config(self.cfg)

    @property
    def world_size(self) -> int:
        return du.get_world_size()


def train(cfg: Config, *, output_dir: Path, resume: str | Path | None = None, resume_obj: dict | None = None,
          init_from: str | None = None, eval_only: bool = False, set_aside_previous: bool = False) -> dict:
    """Run (or resume) the recipe in ``cfg``; returns the run summary (see :func:`summary`).

    ``resume`` is a checkpoint path (the CLI resolves "auto"); ``resume_obj`` is that checkpoint when the caller
    has already loaded it, so a multi-GB file is not read twice. ``set_aside_previous`` (--overwrite) moves a
    previous run's files into ``output_dir/replaced/<time>/`` once this run has taken the folder.
    """
    resume_path = Path(resume) if resume is not None else None
    device = set_up_process(cfg, output_dir)
    resume_obj = read_resume(resume_path, resume_obj)
    with RunFolderLock(output_dir) as lock:
        run = prepare_run(cfg, output_dir, device, resume_obj, init_from, lock, set_aside_previous)
        if eval_only:
            return summary(run, stopped=False, test=evaluate_split(run.model, run.eval_splits, cfg.eval.test_split,
                                                                   run.tokenizer, cfg, device, output_dir))
        prepare_optimisation(run)
        if resume_obj is not None:
            restore_training(run, resume_obj, resume_path)
        try:
            stopped = run_epochs(run)
            return summary(run, stopped, test=None if stopped else interruptible_test(run))
        except StoppedDuringTest as exc:
            logger.warning("received signal %d during the final test: stopped; last.pth holds the finished training, "
                           "--resume auto runs the test", exc.args[0])
            return summary(run, stopped=True, test=None)
        finally:
            run.writer.close()


# -------------------------------------------------------------------------------------------- set up
def set_up_process(cfg: Config, output_dir: Path) -> torch.device:
    """Process group, console logging and seeds (rank r seeds with seed + r); returns this rank's device."""
    device = du.init_distributed(timeout_minutes=cfg.train.dist_timeout_minutes)
    rank = du.get_rank()
    setup_logging(None, rank)
    logger.info("run directory %s, world size %d, device %s, config digest %s", output_dir, du.get_world_size(),
                device, cfg.digest())
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


def prepare_run(cfg: Config, output_dir: Path, device: torch.device, resume_obj: dict | None,
                init_from: str | None, lock: RunFolderLock, set_aside_previous: bool = False) -> Run:
    """Data, tokenizer and model (initialised or resumed); only then does the run directory take this run
    (rank 0 locks it first: a second process that would write there stops with one line)."""
    plan = TaskPlan.from_config(cfg)
    batch, instances = cfg.train.batch_size_per_gpu, cfg.sampler.num_instances
    if plan.identity_batches and batch % instances:  # the P x K sampler, built after the folder is taken
        raise ConfigError(f"train.batch_size_per_gpu {batch} is not a multiple of sampler.num_instances {instances} "
                          "(each batch holds batch_size_per_gpu / num_instances identities)")
    check_neighbour_batches(cfg, plan)
    itm_objective_of(cfg.loss), itm_negatives_of(cfg.loss)  # the objective is built after the folder is taken
    train_records, eval_splits = load_data(cfg, plan)
    check_one_batch(cfg, plan, train_records, du.get_world_size())
    init_source = None if resume_obj is not None else (init_from or cfg.model.init_from)
    init_obj = read_checkpoint_or_folder(init_source) if init_source else None  # read once: tokenizer and weights
    tokenizer = build_run_tokenizer(cfg, train_records, resume_obj,
                                    init=(init_source, init_obj) if init_source else None)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    model = build_network(cfg, device, resume_obj, init_from, init_obj)
    # A run that fails before this point leaves an existing run directory as it was.
    if du.is_main_process():
        lock.acquire()
        replaced = set_aside_previous_run(output_dir) if set_aside_previous else None
        if replaced is not None:
            logger.info("--overwrite: the previous run's files are now in %s (delete it when no longer needed)",
                        replaced)
        remove_orphan_temporaries(output_dir)
        save_config(cfg, output_dir / "config.yaml")  # atomic, before log.txt: a full disk leaves no empty files
    setup_logging(output_dir, du.get_rank())
    save_run_tokenizer(cfg, tokenizer, output_dir)
    run = new_run(cfg, output_dir, device, model, tokenizer, train_records, eval_splits)
    run.caption_words = run_caption_words(cfg, train_records, resume_obj if resume_obj is not None else init_obj)
    return run


def check_neighbour_batches(cfg: Config, plan: TaskPlan) -> None:
    """ConfigError, before the run folder is touched, for neighbour-batch settings this run cannot use."""
    share = cfg.sampler.neighbour_share
    if not 0.0 <= float(share) <= 1.0:
        raise ConfigError(f"sampler.neighbour_share must be in [0, 1], got {share}")
    if cfg.sampler.neighbour_batches and not plan.identity_batches:
        raise ConfigError("sampler.neighbour_batches groups persons in P x K batches, but this task draws plain "
                          "shuffled batches (pretraining): set sampler.neighbour_batches=false")
    if int(cfg.sampler.neighbours_listed) < 1:
        raise ConfigError(f"sampler.neighbours_listed must be >= 1, got {cfg.sampler.neighbours_listed}")


def check_one_batch(cfg: Config, plan: TaskPlan, records: list, world_size: int) -> None:
    """ConfigError, before the run folder is touched, when the training records give no full optimizer step per
    rank: the sampler the loader will use is built here once and asked."""
    batch, accum = cfg.train.batch_size_per_gpu, cfg.train.grad_accum_steps
    try:
        if not plan.identity_batches:
            sampler: Any = ShardedShuffleSampler(len(records), batch, cfg.seed, 0, world_size)
        else:
            sampler = IdentitySampler([r.pid for r in records], batch, cfg.sampler.num_instances, cfg.seed, 0,
                                      world_size)
        batches, problem = sampler.num_batches(), ""
    except ValueError as exc:
        batches, problem = 0, f" ({str(exc).split(': ', 1)[-1]})"
    if batches < accum:
        identities = "" if not plan.identity_batches else f", {len({r.pid for r in records})} identities"
        raise ConfigError(f"the training data ({len(records)} records{identities}) gives {batches} batch(es) per "
                          f"rank, fewer than one optimizer step{problem}: train.batch_size_per_gpu {batch} x "
                          f"{world_size} process(es) x train.grad_accum_steps {accum}; lower "
                          "train.batch_size_per_gpu or train.grad_accum_steps, or train on more data")


def build_network(cfg: Config, device: torch.device, resume_obj: dict | None, init_from: str | None,
                  init_obj: Any = None) -> torch.nn.Module:
    """The model of ``cfg`` on ``device``: initialised as configured (``init_from`` on top, or
    ``cfg.model.init_from``; ``init_obj``: that checkpoint when already read), or resumed."""
    model = build_model(cfg)
    if resume_obj is None:
        initialise_weights(model, cfg, init_from, init_obj)
    else:
        if init_from:
            logger.warning("--init-from %s is ignored: resuming a run", init_from)
        load_model_state(model, resume_obj["model"], "the checkpoint being resumed")
    return model.to(device)


def new_run(cfg: Config, output_dir: Path, device: torch.device, model: torch.nn.Module, tokenizer: Any = None,
            train_records: list | None = None, eval_splits: Any = None) -> Run:
    """A Run around ``model`` with the recipe's objective (a bench passes no data: it feeds its own batches)."""
    objective = RetrievalObjective(model, cfg.loss)  # freezes what no loss reaches, so count after it
    logger.info("model: %.2fM parameters (%.2fM trainable)", sum(p.numel() for p in model.parameters()) / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return Run(cfg, output_dir, device, model, objective, tokenizer, train_records or [], eval_splits)


# ------------------------------------------------------------------------------------- optimisation
def prepare_optimisation(run: Run) -> None:
    """Objective (DDP-wrapped and compiled as configured), loader, optimizer, schedule, scaler, selection."""
    cfg = run.cfg
    set_train_module(run)
    run.loader, run.sampler, run.dataset = build_train_loader(
        cfg, run.train_records, run.tokenizer, rank=du.get_rank(), world_size=run.world_size)
    set_train_epoch(run.sampler, run.dataset, 0)
    run.nominal_steps = steps_in_epoch(run)
    set_optimizer(run)
    run.selection = cfg.eval.selection_split
    if run.selection and (run.eval_splits is None or not getattr(run.eval_splits, run.selection, None)):
        logger.info("no %r split to select on: best.pth will be the last epoch", run.selection)
        run.selection = None
    run.writer = MetricsWriter(run.output_dir, enabled=du.is_main_process())
    run.writer.write_text("config", "```\n" + cfg.to_yaml() + "```")


def set_train_module(run: Run) -> None:
    """What the step calls: the objective, wrapped in DDP when distributed, compiled when train.compile is set."""
    run.train_module = run.objective
    if run.world_size > 1:
        run.train_module = torch.nn.parallel.DistributedDataParallel(
            run.objective, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.train.compile:
        run.train_module = torch.compile(run.train_module)


def set_optimizer(run: Run) -> None:
    """Optimizer, schedule (over ``run.nominal_steps`` steps per epoch) and, for fp16 on a GPU, the grad scaler."""
    cfg = run.cfg
    message = batch_scaling_message(cfg.train, run.world_size)
    if message and du.is_main_process():
        logger.warning(message)
    run.optimizer = build_optimizer(run.model, cfg.train, run.world_size)
    run.scheduler = build_scheduler(run.optimizer, cfg.train, run.nominal_steps)
    if run.device.type == "cuda" and cfg.train.amp == "fp16":
        run.scaler = torch.amp.GradScaler("cuda")


def steps_in_epoch(run: Run) -> int:
    """Optimizer steps in the epoch the sampler points at (P x K batching varies it a little per epoch)."""
    cfg = run.cfg
    steps = len(run.loader) // cfg.train.grad_accum_steps
    if cfg.train.max_steps_per_epoch > 0:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"an epoch has no full batch: {len(run.train_records)} records, train.batch_size_per_gpu "
                          f"{cfg.train.batch_size_per_gpu} x {run.world_size} ranks x train.grad_accum_steps "
                          f"{cfg.train.grad_accum_steps}")
    return steps


def restore_training(run: Run, obj: dict, path: Path | None) -> None:
    """Optimizer, schedule, scaler, progress and this rank's RNG streams from a checkpoint of ours."""
    rank, world_size = du.get_rank(), run.world_size
    if obj.get("world_size", world_size) != world_size:
        logger.warning("resuming a run of world size %d with %d processes: data order and RNG streams differ "
                       "from an uninterrupted run", obj["world_size"], world_size)
    run.optimizer.load_state_dict(obj["optimizer"])
    changes = schedule_changes(obj["config"]["train"], run.cfg.train)
    if changes:
        # The schedule is a function of the config and the step: keep the one built from the new values.
        renew_hyperparameters(run.optimizer, run.model, run.cfg.train)
        logger.warning("resuming with %s: the schedule and the optimizer follow the new values from global step %d",
                       ", ".join(f"train.{k} {old} -> {new}" for k, (old, new) in changes.items()),
                       obj["step"])
    else:
        run.scheduler.load_state_dict(obj["scheduler"])
    if run.scaler is not None and obj.get("scaler"):
        run.scaler.load_state_dict(obj["scaler"])
    run.state = carry_best_over(TrainState.from_checkpoint(obj), path, run.output_dir)
    if hasattr(run.sampler, "check_resume"):
        run.sampler.check_resume(obj.get("shard_stream"))
    saved = obj.get("identity_neighbours")
    if saved is not None and saved["epoch"] == run.state.epoch and run.cfg.sampler.neighbour_batches:
        run.sampler.set_neighbours(saved["lists"].numpy())
        run.neighbours_epoch = run.state.epoch
    dropped = run.writer.keep_until(run.state.global_step)
    if dropped:
        logger.info("metrics.jsonl: dropped %d records after step %d, which this run redoes", dropped,
                    run.state.global_step)
    rng_states = obj["rng"]
    restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    logger.info("resumed from %s at epoch %d, step %d of the epoch", path, run.state.epoch, run.state.step_in_epoch)


# ------------------------------------------------------------------------------------------- epochs
class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves last.pth at the next step boundary and exits."""

    def __init__(self, interrupt: bool = False):
        self.requested = False
        self.signum = 0
        self.interrupt = interrupt  # raise StoppedDuringTest at once instead (the final test has no step boundary)
        self._previous = {}
        self._announced = False

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        # No logging here: the signal may arrive inside a log handler's flush (a reentrant write loses the line);
        # agreed() says it from the loop.
        self.requested, self.signum = True, signum
        if self.interrupt:
            raise StoppedDuringTest(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device) -> bool:
        """Whether any rank was asked to stop (a collective when distributed, so every rank agrees)."""
        if self.requested and not self._announced:
            self._announced = True
            logger.warning("received signal %d: saving last.pth at the next step and stopping", self.signum)
        if not du.is_distributed():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class StallWatchdog(threading.Thread):
    """Warns on every rank when no training step finished for ``seconds``: a stall shows in the log at once; ends
    the run when the loop has waited ``stop_seconds`` for one batch (a loader worker stopped, or stuck in a read).

    A stalled rank (stopped process, hung filesystem) blocks the others in their next collective, silently until
    ``train.dist_timeout_minutes`` ends the job; this thread makes the wait visible while it lasts. A stalled
    loader worker blocks its own process's next batch for ever: after ``stop_seconds`` the thread sends the main
    thread SIGALRM, whose handler raises WorkerStalledError there (only while it waits for a batch, so never
    inside a step), and the loop saves last.pth and ends (see :func:`data_failure`).
    """

    def __init__(self, seconds: float, stop_seconds: float = 0.0):
        super().__init__(daemon=True, name="stall-watchdog")
        self.seconds, self.stop_seconds = seconds, stop_seconds
        self.last_beat = time.monotonic()
        self.where = "starting"
        self.loader: Any = None  # the DataLoader iterator being read: whose workers to look at
        self.waiting_since: float | None = None  # set while the main thread waits for a batch
        self.fetch_failed = False  # the last error came out of the wait for a batch (so between steps)
        self.stalled: str | None = None
        self._done = threading.Event()
        self._previous_alarm: Any = None

    def beat(self, where: str) -> None:
        self.last_beat, self.where = time.monotonic(), where

    def batches(self, loader: Any, batches: Iterator[dict]) -> Iterator[dict]:
        """``batches`` of the DataLoader iterator ``loader``, the waits for each one watched."""
        self.loader = loader
        while True:
            self.waiting_since, self.fetch_failed = time.monotonic(), False
            try:
                item = next(batches)
            except StopIteration:
                return
            except BaseException:
                self.fetch_failed = True
                raise
            finally:
                self.waiting_since = None
            yield item

    def run(self) -> None:
        warned_at = None
        period = min(x for x in (self.seconds, self.stop_seconds, 120.0) if x > 0) / 4
        while not self._done.wait(period):
            quiet = time.monotonic() - self.last_beat
            if self.seconds and quiet >= self.seconds and warned_at != self.last_beat:
                warned_at = self.last_beat
                logger.warning("rank %d: no progress for %.0f s (last: %s); another rank or the filesystem may be "
                               "stalled", du.get_rank(), quiet, self.where)
            waited = time.monotonic() - (self.waiting_since or time.monotonic())
            if self.stop_seconds and waited >= self.stop_seconds and self.stalled is None:
                self.stalled = self.stall_message(waited)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

    def stall_message(self, waited: float) -> str:
        states = worker_states(self.loader)
        stuck = [f"worker {n} (pid {pid}) is {trouble}" for n, pid, trouble in states if trouble]
        who = ("; ".join(stuck) if stuck else f"its {len(states)} loader workers run but deliver nothing" if states
               else "the main process's own reads (data.num_workers 0) hang")
        return (f"rank {du.get_rank()}: no batch for {waited:.0f} s (train.stall_stop_seconds "
                f"{self.stop_seconds:g}; last progress: {self.where}): {who}")

    def _alarm(self, signum: int, frame: Any) -> None:
        if self.stalled is not None and self.waiting_since is not None:  # between steps: the state is whole
            raise WorkerStalledError(self.stalled)
        self.stalled = None  # the batch came just in time: watch the next wait afresh

    def __enter__(self) -> "StallWatchdog":
        if self.stop_seconds > 0:
            try:
                self._previous_alarm = signal.signal(signal.SIGALRM, self._alarm)
            except ValueError:  # not the main thread: warn only
                self.stop_seconds = 0.0
        if self.seconds > 0 or self.stop_seconds > 0:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._previous_alarm is not None:
            if self.is_alive():  # no SIGALRM may come after its handler is gone (its default ends the process)
                self.join(timeout=10.0)
            signal.signal(signal.SIGALRM, self._previous_alarm)


def data_failure(run: Run, watchdog: StallWatchdog, exc: BaseException) -> UserError | None:
    """The one-line error for a training step that could not get its batch (a stalled or killed loader worker),
    with last.pth saved first when the failure came between steps of a single process; None for other errors."""
    if isinstance(exc, WorkerStalledError):
        message = str(exc)
    else:
        died = [(n, pid, trouble) for n, pid, trouble in worker_states(watchdog.loader)
                if trouble and (trouble.startswith("killed") or trouble.startswith("exited"))]
        if not died:
            return None
        number, pid, trouble = died[0]
        cause = (", most likely by the kernel's out-of-memory killer (see dmesg)" if "SIGKILL" in trouble else "")
        message = (f"data loader worker {number} (pid {pid}) was {trouble}{cause}; use fewer workers "
                   f"(data.num_workers {run.cfg.data.num_workers}) or less memory per worker (smaller "
                   "train.batch_size_per_gpu, data.image_cache off), or give the job more memory")
    saved = watchdog.fetch_failed and run.world_size == 1
    if saved:
        save(run, ["last.pth"])
    state = run.state
    where = (f"last.pth saved at epoch {state.epoch} step {state.step_in_epoch}" if saved
             else "last.pth is the last periodic save")
    kind = WorkerStalledError if isinstance(exc, WorkerStalledError) else WorkerDiedError
    return kind(f"{message}; {where}: resume with --resume auto once the cause is fixed")


def run_epochs(run: Run) -> bool:
    """Train from ``run.state`` to the last epoch; True when a stop request ended the run early."""
    # What the steps that follow ran with (versions, thread counts): a fresh run's first record, a resume's at
    # the step it resumes from.
    run.writer.write("environment", run.state.global_step, environment_record(run.device))
    with StopRequest() as stop, StallWatchdog(run.cfg.train.stall_warning_seconds,
                                              run.cfg.train.stall_stop_seconds) as watchdog:
        while run.state.epoch < run.cfg.train.epochs:
            if train_one_epoch(run, stop, watchdog) or end_of_epoch(run, stop, watchdog):
                return True
    return False


def train_one_epoch(run: Run, stop: StopRequest, watchdog: StallWatchdog) -> bool:
    """The optimizer steps of ``run.state.epoch`` from ``step_in_epoch`` on; True when stopped inside it."""
    cfg, state = run.cfg, run.state
    epoch, accum = state.epoch, cfg.train.grad_accum_steps
    if run.plan.identity_batches and cfg.sampler.neighbour_batches and run.neighbours_epoch != epoch:
        run.sampler.set_neighbours(identity_neighbours(run.model, run.train_records, run.sampler.identity_pids,
                                                       run.tokenizer, cfg, run.device, run.sampler.pids_per_batch))
        run.neighbours_epoch = epoch
    set_train_epoch(run.sampler, run.dataset, epoch, state.step_in_epoch * accum)
    steps = steps_in_epoch(run)
    run.objective.train()
    set_schedule(run.scheduler, cfg.train, epoch, epoch * run.nominal_steps)
    # Creating the loader iterator draws worker seeds from the global RNG; items do not depend on them
    # (each item is a function of seed, epoch, index), so keep the global stream untouched for resume.
    with torch.random.fork_rng(devices=[]):
        batches = start_workers(run.loader)
    with closing_workers(batches) as unwrapped:  # workers stop with the epoch, whatever ends it
        try:
            return run_steps(run, watchdog.batches(batches, unwrapped), steps, stop, watchdog)
        except Exception as exc:
            if stopped_with_its_workers(run, stop, watchdog):
                return True
            failure = data_failure(run, watchdog, exc)
            if failure is None:
                raise
            raise failure from None


def stopped_with_its_workers(run: Run, stop: StopRequest, watchdog: StallWatchdog) -> bool:
    """A SIGTERM/SIGINT sent to the whole process group also ends the loader workers, and the wait for a batch
    can fail on their death before the loop sees its own stop flag: that is the requested stop, not a worker
    failure. A single process saves last.pth (between steps, so the state is whole) and stops as asked."""
    if not (stop.requested and watchdog.fetch_failed and run.world_size == 1):
        return False
    stop.agreed(run.device)  # logs the received signal once
    save(run, ["last.pth"])
    return True


def run_steps(run: Run, batches: Iterator[dict], steps: int, stop: StopRequest, watchdog: StallWatchdog) -> bool:
    """The optimizer steps of the epoch until ``steps``, reading ``batches``; True when stopped inside it."""
    cfg, state = run.cfg, run.state
    epoch = state.epoch
    window = LogWindow(run)
    stop_check_every = 1 if run.world_size == 1 else 10
    with tqdm(total=steps, initial=state.step_in_epoch, desc=f"epoch {epoch}", disable=not (du.is_main_process() and interactive()),
              dynamic_ncols=True, leave=False) as progress:
        while state.step_in_epoch < steps:
            if cfg.train.schedule_unit == "step":
                # Progress in nominal steps, so the schedule ends with the last epoch whatever its length.
                set_schedule(run.scheduler, cfg.train, epoch,
                             round((epoch + state.step_in_epoch / steps) * run.nominal_steps))
            run.objective.set_progress(epoch + state.step_in_epoch / steps)  # the ITM hardness ramp
            window.add(optimizer_step(run, batches))
            watchdog.beat(f"epoch {epoch} step {state.step_in_epoch + 1}")
            state.step_in_epoch += 1
            state.global_step += 1
            progress.update(1)
            last_of_epoch = state.step_in_epoch == steps
            if window.steps >= cfg.train.log_every_steps or last_of_epoch:
                window.flush(progress)
            if state.global_step % stop_check_every == 0 and not last_of_epoch and stop.agreed(run.device):
                save(run, ["last.pth"])
                logger.info("stopped at epoch %d step %d; resume with --resume auto", epoch, state.step_in_epoch)
                return True
    return False


def optimizer_step(run: Run, batches: Iterator[dict]) -> dict[str, torch.Tensor]:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the summed (detached) outputs."""
    cfg, accum = run.cfg, run.cfg.train.grad_accum_steps
    scaler, optimizer = run.scaler, run.optimizer
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in next(batches).items()}
        batch = augment_batch(batch, cfg.input)  # data.augment_on: device; a no-op for the CPU path's batches
        sync_context = (run.train_module.no_sync() if run.world_size > 1 and micro < accum - 1
                        else contextlib.nullcontext())
        with sync_context, autocast(run.device, cfg.train.amp):
            out = run.train_module(batch)
        loss = sum(v for k, v in out.items() if k.endswith("_loss"))
        (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        for key, value in out.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
        sums["loss"] = sums.get("loss", 0) + loss.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.train.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


class LogWindow:
    """Sums a few steps' outputs on the device and logs their rank-averaged means with one sync."""

    def __init__(self, run: Run):
        self.run = run
        self.images_per_step = run.cfg.train.batch_size_per_gpu * run.plan.views_per_record
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, step_sums: dict[str, torch.Tensor]) -> None:
        for key, value in step_sums.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.steps += 1

    def flush(self, progress: tqdm) -> None:
        run, state = self.run, self.run.state
        accum = run.cfg.train.grad_accum_steps
        micro_steps = self.steps * accum
        pairs_per_s = (self.images_per_step * run.world_size * micro_steps / (time.perf_counter() - self.started))
        names = sorted(self.sums)
        values = du.all_reduce_mean(torch.stack([self.sums[n] for n in names]) / micro_steps).tolist()
        scalars = dict(zip(names, values))
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{name} is {value} in the {micro_steps} steps up to global step {state.global_step} "
                    f"(epoch {state.epoch}); stopping without saving (last.pth holds the last good state)")
        # The whole run's remaining training time at this window's pace (evaluations not counted).
        remaining_steps = (run.cfg.train.epochs - state.epoch) * run.nominal_steps - state.step_in_epoch
        eta_s = max(remaining_steps, 0) * (time.perf_counter() - self.started) / self.steps
        scalars.update(lr=run.optimizer.param_groups[0]["lr"], epoch=state.epoch, pairs_per_s=pairs_per_s,
                       eta_s=eta_s)
        run.writer.write("train", state.global_step, scalars)
        eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if eta_s < 86400 else f"{eta_s / 86400:.1f} days"
        progress.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{scalars['lr']:.2e}", pairs_s=f"{pairs_per_s:.0f}",
                             run_eta=eta)
        logger.info("epoch %d step %d: %s run ETA %s", state.epoch, state.global_step,
                    " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k not in ("epoch", "eta_s")), eta)
        self._reset()


# --------------------------------------------------------------------------------------- end of epoch
def end_of_epoch(run: Run, stop: StopRequest, watchdog: StallWatchdog) -> bool:
    """Evaluate on the selection split when due, save best/last; True when a stop request ends the run here."""
    cfg, state = run.cfg, run.state
    watchdog.beat(f"end of epoch {state.epoch}")
    epoch = state.epoch
    state.epoch, state.step_in_epoch = epoch + 1, 0
    is_last = state.epoch == cfg.train.epochs
    improved = False
    if run.selection and (state.epoch % cfg.train.eval_every_epochs == 0 or is_last):
        results = evaluate_split(run.model, run.eval_splits, run.selection, run.tokenizer, cfg, run.device,
                                 run.output_dir)
        score = selection_score(results, cfg.eval.selection_metric)
        state.calibration = results.get("calibration")  # carried by the checkpoints saved below
        run.writer.write("eval", state.global_step, {"epoch": epoch, "split": run.selection, "score": score,
                                                     **metric_scalars(results)})
        if score > state.best_metric:
            state.best_metric, state.best_epoch, improved = score, epoch, True
        logger.info("epoch %d: %s %s = %.2f of %s (best %.2f at epoch %d)", epoch, run.selection,
                    cfg.eval.selection_metric, score, selection_ranking(results), state.best_metric, state.best_epoch)
    elif not run.selection:
        state.best_epoch, improved = epoch, True
    stop_now = stop.agreed(run.device)  # one collective, so every rank takes the same branches below
    names = ["best.pth"] if improved else []  # best first: a crash in between leaves a consistent pair
    if state.epoch % cfg.train.save_every_epochs == 0 or is_last or stop_now:
        names.append("last.pth")
    if names:
        save(run, names)
    if stop_now and not is_last:
        logger.info("stopped after epoch %d; resume with --resume auto", epoch)
        return True
    return False


def save(run: Run, names: Sequence[str]) -> None:
    """Write the current state under each of ``names`` in the run directory (a collective)."""
    check_finite_weights(run.model)
    obj = checkpoint_state(run.model, run.optimizer, run.scheduler, run.scaler, run.state, run.cfg, run.tokenizer,
                           run.caption_words)
    if hasattr(run.sampler, "position_record"):  # shards: which corpus the epoch position refers to
        obj["shard_stream"] = run.sampler.position_record()
    if getattr(run.sampler, "neighbours", None) is not None:  # a resume inside this epoch draws the same batches
        obj["identity_neighbours"] = {"epoch": run.neighbours_epoch, "lists": torch.from_numpy(run.sampler.neighbours)}
    for name in names:
        save_checkpoint(obj, run.output_dir / name)


# ------------------------------------------------------------------------------------------ final test
def interruptible_test(run: Run) -> dict | None:
    """:func:`test_selected_model`, where SIGTERM/SIGINT raise StoppedDuringTest at once (the run is saved)."""
    with StopRequest(interrupt=True):
        return test_selected_model(run)


def test_selected_model(run: Run) -> dict | None:
    """Load best.pth and evaluate it on the test split (None when the split is empty)."""
    cfg, state = run.cfg, run.state
    best_path = run.output_dir / "best.pth"
    calibration = None  # no selected checkpoint: the test split calibrates itself (and says so)
    if state.best_epoch >= 0:  # known on every rank (a file check would differ between nodes without a shared disk)
        best = load_file(best_path)
        if best["best_epoch"] != state.best_epoch:
            raise CheckpointError(f"{best_path} holds epoch {best['best_epoch']} but the run selected epoch "
                                  f"{state.best_epoch}; evaluate the file you want with evaluate.py")
        run.model.load_state_dict(best["model"])
        calibration = best.get("calibration")
        logger.info("testing best.pth: epoch %d (%s %.2f)", state.best_epoch, cfg.eval.selection_metric,
                    state.best_metric)
    test_split = cfg.eval.test_split
    results = evaluate_split(run.model, run.eval_splits, test_split, run.tokenizer, cfg, run.device,
                             run.output_dir, checkpoint=str(best_path), calibration=calibration)
    if results is None and run.eval_splits is not None:
        raise SplitError(f"the {test_split!r} split of {run.eval_splits.annotation_file} is empty: nothing to test "
                         "(eval.test_split)")
    if results is not None:
        run.writer.write("test", state.global_step, {"epoch": state.best_epoch, "split": test_split,
                                                     **metric_scalars(results)})
        t2i = results["t2i"]
        logger.info("%s: text-to-image R@1 %.2f%% (chance %.2f%%), R@5 %.2f%%, mAP %.2f%%; all metrics in %s",
                    test_split, t2i["R1"], results["chance_R1"], t2i["R5"], t2i["mAP"],
                    run.output_dir / f"metrics_{test_split}.json")
    return results


def metric_scalars(results: dict) -> dict[str, float]:
    """Every metric of an evaluation as flat names (``t2i/R1``, ``t2i_rerank/mAP``, ``i2t/mINP``, ...)."""
    return {f"{direction}/{name}": value for direction in ("t2i", "t2i_rerank", "t2i_blend", "i2t")
            if direction in results
            for name, value in results[direction].items() if isinstance(value, (int, float))}


def summary(run: Run, stopped: bool, test: dict | None) -> dict:
    """The one return shape of :func:`train`."""
    state = run.state
    return {"stopped": stopped, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "global_step": state.global_step, "test": test, "model": run.model}
