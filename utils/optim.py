"""Optimizer and learning-rate schedule of the recipe (docs/recipe.md).

SGD (momentum 0.9) over every trainable tensor, biases at ``lr * bias_lr_factor``; timm's cosine schedule with
linear warmup from ``warmup_lr_init``, the same floor and warmup start for every group. The authors step it once
per epoch (``schedule_unit: epoch``); ``step`` moves it every optimizer step instead.

Indexing: epoch e (counted from 0) reads the schedule at t = e + ``schedule_epoch_offset``, and the cosine ends
(lr = ``min_lr``) at t = ``schedule_epochs``. The authors' CUHK-PEDES loop reads t = 1..120 (offset 1, 120
epochs); their ICFG-PEDES, RSTPReid and pretraining loops read t = 0..120, i.e. 121 epochs over a 120-epoch
cosine, the last one at ``min_lr`` (offset 0, ``epochs: 121``, ``schedule_epochs: 120``).
"""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler

from utils.config import Config, ConfigError


def global_batch(train_cfg: Config, world_size: int) -> int:
    """Records per optimizer step over all processes: world_size x batch_size_per_gpu x grad_accum_steps."""
    return world_size * train_cfg.batch_size_per_gpu * train_cfg.grad_accum_steps


def linear_scaled_lr(train_cfg: Config, world_size: int) -> float:
    """``train.lr`` scaled linearly from ``train.reference_batch_size`` to this run's global batch."""
    reference = train_cfg.reference_batch_size
    if reference is None:
        return train_cfg.lr
    return train_cfg.lr * global_batch(train_cfg, world_size) / reference


def effective_lr(train_cfg: Config, world_size: int) -> float:
    """The lr the optimizer uses: the linearly scaled one with ``train.scale_lr_with_batch``, else ``train.lr``.
    The config keeps ``train.lr`` as written, so a resumed run scales it once again to the same value."""
    return linear_scaled_lr(train_cfg, world_size) if train_cfg.scale_lr_with_batch else train_cfg.lr


def batch_scaling_message(train_cfg: Config, world_size: int) -> str | None:
    """One line when the global batch differs from the recipe's reference batch (None when it matches or the
    recipe names none): the batch, the reference, the lr in use and the linear rule's lr."""
    reference = train_cfg.reference_batch_size
    batch = global_batch(train_cfg, world_size)
    if reference is None or batch == reference:
        return None
    scaled = linear_scaled_lr(train_cfg, world_size)
    head = (f"global batch {batch} ({world_size} process(es) x train.batch_size_per_gpu "
            f"{train_cfg.batch_size_per_gpu} x train.grad_accum_steps {train_cfg.grad_accum_steps}) differs from "
            f"the {reference} train.lr={train_cfg.lr:g} was tuned for (train.reference_batch_size)")
    if train_cfg.scale_lr_with_batch:
        return f"{head}: training with the linearly scaled lr {scaled:.4g} (train.scale_lr_with_batch=true)"
    return (f"{head}: the linear rule gives lr {scaled:.4g} (train.scale_lr_with_batch=true or "
            f"train.lr={scaled:.4g} applies it); training with {train_cfg.lr:g}, a different recipe")


def parameter_groups(model: torch.nn.Module, train_cfg: Config, world_size: int = 1) -> list[dict]:
    lr = effective_lr(train_cfg, world_size)
    decay, bias = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (bias if "bias" in name else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": train_cfg.weight_decay})
    if bias:
        groups.append({"params": bias, "lr": lr * train_cfg.bias_lr_factor,
                       "weight_decay": train_cfg.weight_decay_bias})
    return groups


def implementation_flags(train_cfg: Config) -> dict:
    """torch.optim keyword arguments of ``train.optimizer_impl``: {} (torch's choice), foreach or fused.

    foreach updates all tensors with a few multi-tensor kernels and gives the for-loop's fp32 results bit for bit;
    fused runs the whole update in one kernel per group and dtype and may differ in the last bit (fused
    multiply-add).
    """
    impl = train_cfg.get("optimizer_impl", "default")
    if impl == "default":
        return {}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "fused":
        return {"fused": True}
    raise ValueError(f"train.optimizer_impl must be 'default', 'foreach' or 'fused', got {impl!r}")


def build_optimizer(model: torch.nn.Module, train_cfg: Config, world_size: int = 1) -> torch.optim.Optimizer:
    groups = parameter_groups(model, train_cfg, world_size)
    lr = effective_lr(train_cfg, world_size)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    impl = implementation_flags(train_cfg)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum, **impl)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(train_cfg.betas), **impl)
    raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train_cfg.optimizer!r}")


def schedule_length(train_cfg: Config) -> int:
    """T, the cosine's length in epochs (``train.schedule_epochs``, or ``train.epochs`` when that is null)."""
    length = train_cfg.schedule_epochs
    if length is None:
        return train_cfg.epochs
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"train.schedule_epochs must be a positive integer or null, got {length!r}")
    return length


def schedule_offset(train_cfg: Config) -> int:
    """Epochs the schedule is read ahead of the 0-based epoch index (``train.schedule_epoch_offset``)."""
    offset = train_cfg.schedule_epoch_offset
    if offset < 0:
        raise ValueError(f"train.schedule_epoch_offset must be >= 0, got {offset}")
    return offset


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Config, steps_per_epoch: int) -> CosineLRScheduler:
    """Cosine to ``min_lr`` over ``schedule_epochs`` (default ``epochs``) after ``warmup_epochs`` of linear warmup
    (timm semantics: at t = T and after, the lr is ``min_lr``)."""
    if train_cfg.schedule_unit == "epoch":
        scale, in_epochs = 1, True
    elif train_cfg.schedule_unit == "step":
        scale, in_epochs = max(1, steps_per_epoch), False
    else:
        raise ValueError(f"train.schedule_unit must be 'epoch' or 'step', got {train_cfg.schedule_unit!r}")
    schedule_offset(train_cfg)  # a bad value fails here, before training starts
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, schedule_length(train_cfg) * scale),
        lr_min=train_cfg.min_lr,
        warmup_t=train_cfg.warmup_epochs * scale,
        warmup_lr_init=train_cfg.warmup_lr_init,
        warmup_prefix=False,
        cycle_limit=1,
        t_in_epochs=in_epochs,
    )


def set_schedule(scheduler: CosineLRScheduler, train_cfg: Config, epoch: int, global_step: int) -> None:
    """Put the optimizer's learning rates where the schedule says for this point of training.

    ``epoch`` counts from 0; the schedule is read ``train.schedule_epoch_offset`` epochs further on (in step mode,
    that many epochs' worth of steps, the steps per epoch being those the scheduler was built with).
    """
    offset = schedule_offset(train_cfg)
    if train_cfg.schedule_unit == "epoch":
        scheduler.step(epoch + offset)
    else:
        steps_per_epoch = max(1, scheduler.t_initial // max(1, schedule_length(train_cfg)))
        scheduler.step_update(global_step + offset * steps_per_epoch)


# train.* keys that shape the learning-rate schedule or the optimizer's update. The schedule is a function of these
# and of the step, so a resumed run can take new values from the step it resumes at.
SCHEDULE_KEYS = ("lr", "bias_lr_factor", "epochs", "schedule_epochs", "schedule_epoch_offset", "schedule_unit",
                 "warmup_epochs", "warmup_lr_init", "min_lr", "weight_decay", "weight_decay_bias", "momentum",
                 "betas")


def schedule_changes(saved_train: dict, train_cfg: Config) -> dict[str, tuple]:
    """{key: (saved value, new value)} for the SCHEDULE_KEYS whose value differs from the checkpoint's config.

    ConfigError when ``train.optimizer`` differs: the saved optimizer state belongs to the saved optimizer.
    """
    if saved_train.get("optimizer", train_cfg.optimizer) != train_cfg.optimizer:
        raise ConfigError(f"train.optimizer is {train_cfg.optimizer!r} but the resumed run trained with "
                                f"{saved_train['optimizer']!r}, whose state it holds; keep it, or start a new run "
                                "from these weights with --init-from")
    changes = {}
    for key in SCHEDULE_KEYS:
        old, new = saved_train.get(key), train_cfg.get(key)
        if key in saved_train and _plain(old) != _plain(new):
            changes[key] = (old, new)
    return changes


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def renew_hyperparameters(optimizer: torch.optim.Optimizer, model: torch.nn.Module, train_cfg: Config) -> None:
    """Give a restored optimizer's parameter groups the lr, weight decay, momentum and betas of ``train_cfg``.

    The groups are those of :func:`parameter_groups` (same order); ``initial_lr`` is the schedule's base value.
    """
    for group, fresh in zip(optimizer.param_groups, parameter_groups(model, train_cfg)):
        group["lr"] = group["initial_lr"] = fresh["lr"]
        group["weight_decay"] = fresh["weight_decay"]
        if "momentum" in group:
            group["momentum"] = train_cfg.momentum
        if "betas" in group:
            group["betas"] = tuple(train_cfg.betas)
