"""The training loop shared by every entry script: data, model, optimisation, evaluation, checkpoints, resume.

Entry scripts only parse arguments and call :func:`train_main`. One run directory holds ``config.yaml``,
``log.txt``, ``metrics.jsonl``, ``last.pth``, ``best.pth`` and the ``metrics_<split>.json`` files.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from utils import distributed as du
from utils.checkpoint import (FORMAT_NAME, FORMAT_VERSION, atomic_save, capture_rng_state, detect_format,
                              load_file, restore_rng_state, tokenizer_from_record, tokenizer_record)
from utils.config import Config, config_from_dict, load_config, save_config
from utils.logging_utils import MetricsWriter, setup_logging
from utils.optim import build_optimizer, build_scheduler, set_schedule

logger = logging.getLogger("engine")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the loss and the steps."""


@dataclass
class TrainState:
    epoch: int = 0  # the epoch to run next (or the one interrupted)
    step_in_epoch: int = 0  # optimizer steps already done inside ``epoch``
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1


# ----------------------------------------------------------------------------------------------- data
def _synthesize_if_missing(cfg: Config) -> None:
    """Write the synthetic dataset into data.root when it is absent (rank 0 decides and writes; all wait).

    It is written next to the root and renamed into place, so an interrupted synthesis never leaves a
    half-written dataset that a later run would take for a real one.
    """
    if not cfg.data.synthesize_if_missing:
        return
    root = Path(cfg.data.root)
    if du.is_main_process() and not (root.is_dir() and any(root.iterdir())):
        from datasets.synthetic import make_synthetic

        logger.info("data.root %s is missing: writing the synthetic %s dataset (%d identities) there",
                    root, cfg.data.format, cfg.data.synthetic_num_ids)
        partial = root.with_name(root.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        make_synthetic(cfg.data.format, partial, num_ids=cfg.data.synthetic_num_ids, seed=cfg.data.synthetic_seed)
        if root.is_dir():
            root.rmdir()  # empty, checked above
        partial.rename(root)
    du.barrier()


def pretrain_corpora(cfg: Config) -> list[dict]:
    corpora = [dict(c) for c in cfg.data.pretrain_corpora]
    if not corpora and cfg.data.format == "pretrain":
        # The synthetic pretraining corpus (python -m datasets.synthetic --format pretrain) lives in data.root.
        corpora = [{"annotation": str(Path(cfg.data.root) / "pretrain.json"), "image_root": cfg.data.root}]
    return corpora


def load_data(cfg: Config):
    """(train records, eval splits or None): the fine-tuning dataset, or the pretraining corpora + eval set."""
    from datasets.readers import check_images, load_annotations, load_pretrain_corpora

    _synthesize_if_missing(cfg)
    if cfg.data.format == "pretrain":
        train = load_pretrain_corpora(pretrain_corpora(cfg))
        eval_splits = (load_annotations(cfg.data.eval_format, cfg.data.eval_root)
                       if cfg.data.eval_root else None)
    else:
        eval_splits = load_annotations(cfg.data.format, cfg.data.root, cfg.data.annotation_file)
        train = eval_splits.train
    if cfg.data.check_images and du.is_main_process():
        check_images(train)
        if eval_splits is not None:
            check_images(eval_splits.val + eval_splits.test)
    du.barrier()
    return train, eval_splits


def build_run_tokenizer(cfg: Config, train_records, resume_obj: dict | None):
    """The tokenizer: from the checkpoint being resumed, learnt on rank 0 and shared, or loaded by name."""
    from datasets.tokenizer import build_tokenizer, tokenizer_from_vocab, tokenizer_vocab

    if resume_obj is not None:
        return tokenizer_from_record(resume_obj.get("tokenizer"), cfg.text)
    if cfg.text.tokenizer == "train":
        vocab = None
        if du.is_main_process():
            vocab = tokenizer_vocab(build_tokenizer(cfg.text, train_captions=[r.caption for r in train_records]))
        vocab = du.broadcast_object(vocab)
        return tokenizer_from_vocab(vocab, cfg.text.lowercase)
    return build_tokenizer(cfg.text)


# ---------------------------------------------------------------------------------------------- model
def initialise_weights(model, cfg: Config, init_from: str | None) -> None:
    """Explicit pretrained-weight loading: ViT and BERT first, then an IVT checkpoint on top."""
    from models.weights import load_bert_weights, load_vit_weights

    if cfg.model.vit_weights:
        load_vit_weights(model, cfg.model.vit_weights)
    if cfg.model.bert_weights:
        load_bert_weights(model, cfg.model.bert_weights)
    source = init_from or cfg.model.init_from
    if source:
        # A temperature learnt on raw features (the authors' pretraining) is meaningless for normalised ITC.
        init_from_checkpoint(model, source, skip=("temperature",) if cfg.loss.itc_normalize else ())


def init_from_checkpoint(model, path: str, skip: Sequence[str] = ()) -> None:
    """Copy matching tensors of our or the authors' checkpoint (e.g. IVT pretraining) into ``model``.

    Grid embeddings are resampled when the patch grid differs; tensors the model lacks (a pretraining fusion stack
    when the recipe has none) and model tensors the checkpoint lacks are both listed in the log.
    """
    from models.convert_official import convert_official
    from models.weights import adapt_grid_embeddings

    obj = load_file(path)
    kind = detect_format(obj)
    if kind == "ours":
        state = obj["model"]
    elif kind == "official":
        state, _ = convert_official(obj)
    else:
        raise ValueError(f"--init-from {path}: neither our checkpoint nor an authors' IVT checkpoint")
    state = adapt_grid_embeddings({k: v for k, v in state.items() if k not in skip}, model, prefix="encoder.")
    if skip:
        logger.info("--init-from: not taking %s from the checkpoint (kept at their configured init)", list(skip))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"--init-from {path}: shapes differ for {mismatched[:5]} (e.g. {mismatched[0]}: "
                         f"{tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)})")
    model.load_state_dict(usable, strict=False)
    unused = sorted(set(state) - set(usable))
    fresh = sorted(set(own) - set(usable))
    logger.info("initialised %d tensors from %s (%s format); %d checkpoint tensors unused%s; %d model tensors "
                "not in the checkpoint%s", len(usable), path, kind, len(unused), f" {unused[:6]}" if unused else "",
                len(fresh), f" {fresh[:6]}" if fresh else "")


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_split(model, splits, split_name: str, tokenizer, cfg: Config, device, output_dir: Path | None,
                   checkpoint: str | None = None) -> dict | None:
    """Evaluate one split (None when it is empty); writes metrics_<split>.json when output_dir is given."""
    from utils.evaluation import evaluate_model, write_metrics_json

    records = getattr(splits, split_name, None) if splits is not None else None
    if not records:
        return None
    # Evaluation must not move the training RNG streams, or resumed runs would diverge from uninterrupted ones.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        results = evaluate_model(model, records, tokenizer, cfg, device, split_name)
    if output_dir is not None and du.is_main_process():
        write_metrics_json(output_dir / f"metrics_{split_name}.json", results, checkpoint, cfg)
    return results


def selection_score(results: dict, metric: str) -> float:
    t2i = results["t2i_rerank"] if "t2i_rerank" in results else results["t2i"]
    if metric == "R1+mAP":
        return 0.5 * (t2i["R1"] + t2i["mAP"])
    if metric not in t2i:
        raise ValueError(f"eval.selection_metric {metric!r} is not one of R1, mAP, R1+mAP")
    return t2i[metric]


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoint_state(model, optimizer, scheduler, scaler, state: TrainState, cfg: Config, tokenizer) -> dict:
    rng = capture_rng_state()
    if du.is_distributed():
        gathered = [None] * du.get_world_size()
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "step": state.global_step,
        "best_metric": state.best_metric, "best_epoch": state.best_epoch,
        "config": cfg.to_dict(), "tokenizer": tokenizer_record(tokenizer, cfg.text), "rng": rng,
        "world_size": du.get_world_size(),
    }


def save_checkpoint(obj: dict, path: Path) -> None:
    """Collective: every rank must call it (RNG states are gathered); rank 0 writes, then all wait."""
    if du.is_main_process():
        atomic_save(obj, path)
    du.barrier()


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        path = output_dir / "last.pth"
        if not path.is_file():
            logger.info("--resume auto: no %s yet, starting a new run", path)
            return None
        return path
    return Path(resume)


# ------------------------------------------------------------------------------------------- training
class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves last.pth at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("received signal %d: saving last.pth at the next step and stopping", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device) -> bool:
        """Whether any rank was asked to stop (a collective when distributed, so every rank agrees)."""
        if not du.is_distributed():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(cfg: Config, device):
    if device.type != "cuda" or cfg.train.amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    if dtype is None:
        raise ValueError(f"train.amp must be bf16, fp16 or none, got {cfg.train.amp!r}")
    return torch.autocast("cuda", dtype=dtype)


def train(cfg: Config, *, output_dir: Path, resume: str | Path | None = None, resume_obj: dict | None = None,
          init_from: str | None = None, eval_only: bool = False, stop_after_steps: int | None = None) -> dict:
    """Run (or resume) the recipe in ``cfg``; returns {"test": metrics or None, "best_metric": ..., ...}.

    ``resume`` is a checkpoint path (``train_main`` resolves "auto"); ``resume_obj`` is that checkpoint when the
    caller has already loaded it, so a multi-GB file is not read twice.
    """
    from datasets.build import build_train_loader
    from models.ivt import build_model
    from models.objectives import RetrievalObjective

    device = du.init_distributed()
    rank, world_size = du.get_rank(), du.get_world_size()
    resume_path = Path(resume) if resume is not None else None
    if resume_path is not None and resume_obj is None:
        resume_obj = load_file(resume_path)
    if resume_obj is not None and detect_format(resume_obj) != "ours":
        raise ValueError(f"--resume {resume_path}: not one of our checkpoints")

    setup_logging(None, rank)
    logger.info("run directory %s, world size %d, device %s, config digest %s", output_dir, world_size, device,
                cfg.digest())
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    train_records, eval_splits = load_data(cfg)
    tokenizer = build_run_tokenizer(cfg, train_records, resume_obj)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is {cfg.model.vocab_size}")

    model = build_model(cfg)
    if resume_obj is None:
        initialise_weights(model, cfg, init_from)
    else:
        if init_from:
            logger.warning("--init-from %s is ignored: resuming from %s", init_from, resume_path)
        if resume_obj.get("world_size", world_size) != world_size:
            logger.warning("resuming a run of world size %d with %d processes: data order and RNG streams differ "
                           "from an uninterrupted run", resume_obj["world_size"], world_size)
        model.load_state_dict(resume_obj["model"])
    model.to(device)
    # Only now, with data and model in hand, does the run directory take this run's config and log; a run that
    # fails to start leaves an existing run directory as it was.
    setup_logging(output_dir, rank)
    if du.is_main_process():
        save_config(cfg, output_dir / "config.yaml")
        if cfg.text.tokenizer == "train":
            from datasets.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, output_dir / "tokenizer")  # the learnt vocabulary, also kept in checkpoints
    objective = RetrievalObjective(model, cfg.loss)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters (%.2fM trainable)", n_params / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)

    test_split = cfg.eval.test_split
    if eval_only:
        results = evaluate_split(model, eval_splits, test_split, tokenizer, cfg, device, output_dir)
        return {"test": results, "model": model}

    train_module = objective
    if world_size > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_module = torch.compile(train_module)

    loader, sampler, dataset = build_train_loader(cfg, train_records, tokenizer, rank=rank, world_size=world_size,
                                                  pretrain=cfg.data.format == "pretrain")
    accum = cfg.train.grad_accum_steps

    def epoch_steps(epoch: int) -> int:
        # P x K batching makes the number of batches vary a little from epoch to epoch.
        sampler.set_epoch(epoch)
        steps = len(loader) // accum
        if cfg.train.max_steps_per_epoch > 0:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        if steps == 0:
            raise ValueError(f"an epoch has no full batch: {len(train_records)} records, batch "
                             f"{cfg.train.batch_size_per_gpu} x {world_size} ranks x accumulation {accum}")
        return steps

    nominal_steps = epoch_steps(0)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, nominal_steps)
    use_scaler = device.type == "cuda" and cfg.train.amp == "fp16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    state = TrainState()
    if resume_obj is not None:
        optimizer.load_state_dict(resume_obj["optimizer"])
        scheduler.load_state_dict(resume_obj["scheduler"])
        if scaler is not None and resume_obj.get("scaler"):
            scaler.load_state_dict(resume_obj["scaler"])
        state = TrainState(resume_obj["epoch"], resume_obj["step_in_epoch"], resume_obj["step"],
                           resume_obj["best_metric"], resume_obj["best_epoch"])
        rng_states = resume_obj["rng"]
        restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        logger.info("resumed from %s at epoch %d, step %d of the epoch", resume_path, state.epoch,
                    state.step_in_epoch)

    selection = cfg.eval.selection_split
    if selection and (eval_splits is None or not getattr(eval_splits, selection, None)):
        logger.info("no %r split to select on: best.pth will be the last epoch", selection)
        selection = None
    writer = MetricsWriter(output_dir, enabled=du.is_main_process())
    images_per_step = cfg.train.batch_size_per_gpu * (1 if cfg.data.format == "pretrain" else cfg.input.num_views)
    stop_check_every = 1 if world_size == 1 else 10

    def save(kind_names: Sequence[str]) -> None:
        obj = checkpoint_state(model, optimizer, scheduler, scaler, state, cfg, tokenizer)
        for name in kind_names:
            save_checkpoint(obj, output_dir / name)

    stopped = False
    with _StopRequest() as stop:
        while state.epoch < cfg.train.epochs and not stopped:
            epoch = state.epoch
            steps_per_epoch = epoch_steps(epoch)
            dataset.set_epoch(epoch)
            sampler.set_start_batch(state.step_in_epoch * accum)
            objective.train()
            set_schedule(scheduler, cfg.train, epoch, epoch * nominal_steps)
            # Creating the loader iterator draws worker seeds from the global RNG; items do not depend on them
            # (each item is a function of seed, epoch, index), so keep the global stream untouched for resume.
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            sums: dict[str, torch.Tensor] = {}
            window_start, window_steps = time.perf_counter(), 0
            progress = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {epoch}",
                            disable=not du.is_main_process(), dynamic_ncols=True, leave=False)
            while state.step_in_epoch < steps_per_epoch:
                if cfg.train.schedule_unit == "step":
                    # Progress in nominal steps, so the schedule ends with the last epoch whatever its length.
                    set_schedule(scheduler, cfg.train, epoch,
                                 round((epoch + state.step_in_epoch / steps_per_epoch) * nominal_steps))
                for micro in range(accum):
                    batch = _to_device(next(batches), device)
                    sync_context = (train_module.no_sync() if world_size > 1 and micro < accum - 1
                                    else contextlib.nullcontext())
                    with sync_context, _autocast(cfg, device):
                        out = train_module(batch)
                    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
                    (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                    for key, value in out.items():
                        sums[key] = sums.get(key, 0) + value.detach().float()
                    sums["loss"] = sums.get("loss", 0) + loss.detach().float()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.train.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step_in_epoch += 1
                state.global_step += 1
                window_steps += 1
                progress.update(1)
                last_of_epoch = state.step_in_epoch == steps_per_epoch
                if window_steps >= cfg.train.log_every_steps or last_of_epoch:
                    _log_window(sums, window_steps * accum, state, epoch, optimizer, writer, progress,
                                images_per_step * world_size * accum * window_steps
                                / (time.perf_counter() - window_start))
                    sums, window_start, window_steps = {}, time.perf_counter(), 0
                if stop_after_steps is not None and state.global_step >= stop_after_steps:
                    stop.requested = True
                if state.global_step % stop_check_every == 0 and not last_of_epoch and stop.agreed(device):
                    save(["last.pth"])
                    logger.info("stopped at epoch %d step %d; resume with --resume auto", epoch,
                                state.step_in_epoch)
                    stopped = True
                    break
            progress.close()
            if stopped:
                break
            state.epoch, state.step_in_epoch = epoch + 1, 0
            is_last = state.epoch == cfg.train.epochs
            improved = False
            if selection and (state.epoch % cfg.train.eval_every_epochs == 0 or is_last):
                results = evaluate_split(model, eval_splits, selection, tokenizer, cfg, device, output_dir)
                score = selection_score(results, cfg.eval.selection_metric)
                writer.write("eval", state.global_step, {"epoch": epoch, "split": selection, "score": score})
                if score > state.best_metric:
                    state.best_metric, state.best_epoch, improved = score, epoch, True
                logger.info("epoch %d: %s %s = %.2f (best %.2f at epoch %d)", epoch, selection,
                            cfg.eval.selection_metric, score, state.best_metric, state.best_epoch)
            elif not selection:
                state.best_epoch, improved = epoch, True
            stop_now = stop.agreed(device)  # one collective, so every rank takes the same branches below
            names = []
            if state.epoch % cfg.train.save_every_epochs == 0 or is_last or stop_now:
                names.append("last.pth")
            if improved:
                names.append("best.pth")
            if names:
                save(names)
            if stop_now and not is_last:
                logger.info("stopped after epoch %d; resume with --resume auto", epoch)
                stopped = True
    writer.close()
    summary = {"stopped": stopped, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
               "global_step": state.global_step, "test": None, "model": model}
    if stopped:
        return summary
    best_path = output_dir / "best.pth"
    if state.best_epoch >= 0:  # known on every rank (a file check would differ between nodes without a shared disk)
        model.load_state_dict(load_file(best_path)["model"])
    summary["test"] = evaluate_split(model, eval_splits, test_split, tokenizer, cfg, device, output_dir,
                                     checkpoint=str(best_path))
    if summary["test"] is not None:
        t2i = summary["test"]["t2i"]
        logger.info("%s: text-to-image R@1 %.2f%% (chance %.2f%%), R@5 %.2f%%, mAP %.2f%%; all metrics in %s",
                    test_split, t2i["R1"], summary["test"]["chance_R1"], t2i["R5"], t2i["mAP"],
                    output_dir / f"metrics_{test_split}.json")
    return summary


def _log_window(sums, micro_steps, state: TrainState, epoch, optimizer, writer, progress, pairs_per_s) -> None:
    names = sorted(sums)
    values = du.all_reduce_mean(torch.stack([sums[n] for n in names]) / micro_steps).tolist()
    scalars = dict(zip(names, values))
    for name, value in scalars.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"{name} is {value} in the {micro_steps} steps up to global step {state.global_step} "
                f"(epoch {epoch}); stopping without saving (last.pth holds the last good state)")
    scalars.update(lr=optimizer.param_groups[0]["lr"], epoch=epoch, pairs_per_s=pairs_per_s)
    writer.write("train", state.global_step, scalars)
    progress.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{scalars['lr']:.2e}", pairs_s=f"{pairs_per_s:.0f}")
    logger.info("epoch %d step %d: %s", epoch, state.global_step,
                " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k not in ("epoch",)))


# ------------------------------------------------------------------------------------------------ CLI
def build_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"recipe YAML (default {default_config})")
    parser.add_argument("--output-dir", default=None, help="run directory (default: output_dir of the config)")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a last.pth; 'auto' takes <output-dir>/last.pth when it exists")
    parser.add_argument("--init-from", default=None, help="initialise from our or the authors' checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the test split and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def train_main(argv: Sequence[str] | None, *, description: str, default_config: str,
               stop_after_steps: int | None = None) -> dict:
    """Shared main() of the train_*.py scripts."""
    from datasets.records import DataFormatError
    from datasets.tokenizer import TokenizerError
    from utils.checkpoint import CheckpointError
    from utils.config import ConfigError

    args = build_parser(description, default_config).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        output_dir = Path(args.output_dir or cfg.output_dir)
        resume_path = resolve_resume(args.resume, output_dir)
        resume_obj = load_file(resume_path) if resume_path is not None else None
        if resume_obj is not None:
            # A resumed run keeps the configuration it started with; overrides still apply on top.
            cfg = config_from_dict(resume_obj["config"], args.overrides, source=str(resume_path))
            if args.config != default_config:
                logger.warning("--config %s is ignored: a resumed run keeps the config stored in %s",
                               args.config, resume_path)
        cfg = cfg.replace([f"output_dir={output_dir}"])
        return train(cfg, output_dir=output_dir, resume=resume_path, resume_obj=resume_obj, init_from=args.init_from,
                     eval_only=args.eval_only, stop_after_steps=stop_after_steps)
    except (ConfigError, DataFormatError, CheckpointError, TokenizerError, FileNotFoundError) as exc:
        # The user's input is wrong (config, data, checkpoint, weights): one line, no stack trace.
        raise SystemExit(f"error: {exc}") from None
    finally:
        du.cleanup_distributed()
