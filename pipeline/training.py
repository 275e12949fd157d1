"""The training library under the training stages: a step-counted loop with EMA, bf16 autocast,
DDP, signals and exact resume, and what it needs (data order, LR schedule, EMA, CSV log, final save).

Every training stage counts optimizer steps, not epochs. The data order is a seeded
permutation per epoch derived from (seed, epoch), so the position in the data is a function
of the step alone. Every ``checkpoint_every`` steps the full state (model, EMA, optimizer, LR
schedule, step, RNG states, log rows, elapsed time) goes into ``<stage>/checkpoint.pt`` (one
fixed name from :meth:`pipeline.io.RunPaths.checkpoint`); every start resumes from it if present and
made for the same config. The final ``<stage>/model.pt`` holds ``kind`` and ``args`` so that
:func:`pipeline.checkpoint.load_model` rebuilds the network through the one factory.

The shape follows improved-diffusion's ``TrainLoop``: :class:`TrainLoop` holds the state and
reads as a few named steps (:meth:`TrainLoop.resume`, :meth:`TrainLoop.step`,
:meth:`TrainLoop.save_checkpoint`, :meth:`TrainLoop.run`), :func:`train_loop` is its one-call
form and returns a :class:`TrainResult`. Imports only the leaf modules (checkpoint, io, runtime):
no stage module.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint as ckpt_io
from pipeline.io import RunPaths, atomic_write_text
from pipeline.runtime import Progress, StopSignals, autocast, dist_info, log, requeue_signals, seed_everything

__all__ = [
    "Batcher",
    "lr_lambda",
    "ema_avg_fn",
    "write_csv",
    "TrainResult",
    "TrainLoop",
    "TensorBoard",
    "train_loop",
    "save_model",
    "finish_stage",
    "finish_training",
    "drop_labels",
    "guide_step",
    "checkpoint_steps",
    "TrainingStage",
]


class Batcher:
    """Deterministic mini-batch indices as a function of the step.

    Epoch e uses ``torch.randperm(n)`` drawn from a generator seeded with (seed, e); step s
    takes batch s mod (n // batch_size) of epoch s // (n // batch_size). A batch larger than
    the data is clipped to n. ``batcher(step)`` returns int64 (batch_size,) indices in [0, n).

    Raises:
        ValueError: n < 1.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("cannot train on an empty dataset")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.steps_per_epoch = max(1, n // self.batch_size)
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up over ``warmup``
    steps to 1, then cosine decay to 0.1 at step ``total`` (and 0.1 after it)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def ema_avg_fn(decay: float) -> Callable:
    """EMA update with warm-up for ``torch.optim.swa_utils.AveragedModel(avg_fn=...)``.

    avg <- d * avg + (1 - d) * param with d = min(decay, (1 + n) / (10 + n)) after n updates
    (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, diffusers' ``EMAModel``):
    without the warm-up a 0.999 EMA of a short run still carries the random initialisation.
    """

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return d * averaged + (1.0 - d) * current

    return avg_fn


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write the log rows (dicts with the same keys) as CSV, atomically; nothing for no rows."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class TensorBoard:
    """The TensorBoard event files of one training stage (``torch.utils.tensorboard``'s
    ``SummaryWriter``: TensorBoard's own format, read by ``tensorboard --logdir results/<run>``),
    written by rank 0 only; every method is a no-op when ``folder`` is None (``tensorboard: false``)
    or on other ranks.

    Args:
        folder: the event folder (``<stage>/tensorboard/``), or None.
        purge_step: on a resumed run, the step it resumes from: events of the interrupted run at
            or after it are dropped, so a curve never has two values for one step.
    """

    def __init__(self, folder: Path | None, purge_step: int = 0):
        self.writer = None
        if folder is not None and dist_info()[0] == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step or None)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train/") -> None:
        """``values`` as scalars ``<prefix><name>`` at ``step`` (NaN and None skipped)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """Float (C, H, W) images in [0, 1] at ``step``."""
        if self.writer is None:
            return
        for name, image in images.items():
            self.writer.add_image(name, image.detach().float().clamp(0, 1).cpu(), step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class TrainResult:
    """What a finished :class:`TrainLoop` hands to its stage.

    Attributes:
        ema: the ``AveragedModel`` of the weights, or None without ``ema_decay``.
        rows: the log rows (step, lr, loss and the compute_loss extras, window means).
        elapsed_s: training seconds, including earlier interrupted runs.
        resumed_s: the part of ``elapsed_s`` from earlier runs (0 for a fresh start).
        final_loss: mean loss of the last log window (NaN without rows).
        guide: the state dict taken at ``guide_step`` (the EMA weights when there is an EMA): the
            guide of autoguidance, or None.
        steps, batch_size: the optimizer steps trained and the global batch.
    """

    ema: Any
    rows: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    resumed_s: float = 0.0
    final_loss: float = float("nan")
    guide: dict | None = None
    steps: int = 0
    batch_size: int = 0


class TrainLoop:
    """``section['steps']`` Adam steps of ``model``, resuming from ``out_dir/checkpoint.pt``.

    Args:
        stage: name used in log lines.
        model: the network, already on ``device``.
        kind, model_args: the factory's model name and constructor kwargs, stored in the checkpoint
            (as ``kind`` and ``args``).
        section: the stage's config section (steps, batch_size, lr, seed, log_every,
            checkpoint_every); a checkpoint made for another section is not resumed.
        compute_loss: ``(net, idx, shard) -> (scalar loss, dict of float tensors to log)``: ``net``
            is the model (wrapped in DistributedDataParallel when there are several ranks),
            ``idx`` the global batch's indices (B,) int64, and ``shard(t)`` takes this rank's
            part ``t[rank::world]`` of a tensor made for the whole batch. Draw per-step
            randomness for the whole batch and shard it: every rank then sees what a single
            process would, and the mean of the ranks' gradients is the single-process gradient.
        n_data: number of training examples.
        out_dir: the stage folder (``checkpoint.pt`` and ``train_log.csv`` go there).
        ema_decay: keep an EMA of the weights with this decay (``torch.optim.swa_utils``).
        grad_clip: max global gradient norm (None: no clipping).
        warmup: linear LR warm-up steps (at most a tenth of the steps), then cosine decay to 10 %.
        guide_step: after this many steps, keep a copy of the weights (the EMA weights when there
            is an EMA): the guide, the "bad version of itself" that autoguidance guides away from
            (Karras et al. 2024). Kept in the resume checkpoint, so a resumed run has it too.
        tensorboard: the stage's TensorBoard folder (None: no event files): every log row's
            values under ``train/`` (the loss and what ``compute_loss`` logs), the learning rate,
            the EMA's effective decay and steps/s (:class:`TensorBoard`).
        images: called on rank 0 at every checkpoint and at the end (in eval mode, without
            gradients; it must not draw random numbers): {name: float (C, H, W) in [0, 1]} for
            TensorBoard (the VQ-VAE's reconstructions).
        data: the stage's :class:`pipeline.streaming.StageData`, started at the resume step
            (its stream path prefetches each step's batch); ``shard_loading``: it loads only this
            rank's shard of each batch (False where ``compute_loss`` needs the whole batch).

    Raises:
        ValueError: batch_size not divisible by the number of ranks, or no data.
    """

    def __init__(
        self,
        *,
        stage: str,
        model: torch.nn.Module,
        kind: str,
        model_args: Mapping[str, Any],
        section: Mapping[str, Any],
        compute_loss: Callable[..., tuple[torch.Tensor, dict]],
        n_data: int,
        out_dir: Path,
        device: torch.device,
        bf16: bool = False,
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        warmup: int = 100,
        guide_step: int | None = None,
        tensorboard: Path | None = None,
        images: Callable[[], Mapping[str, torch.Tensor]] | None = None,
        data: Any = None,
        shard_loading: bool = True,
    ):
        self.stage, self.model, self.kind, self.section = stage, model, kind, dict(section)
        self.model_args = dict(model_args)
        self.compute_loss, self.device, self.bf16, self.grad_clip = compute_loss, device, bf16, grad_clip
        self.guide_step = guide_step
        self.tensorboard_folder, self.images = tensorboard, images
        self.data, self.shard_loading = data, shard_loading
        self.ema_decay = ema_decay
        self.steps = int(section["steps"])
        self.rank, self.world = dist_info()
        if int(section["batch_size"]) % self.world:
            raise ValueError(
                f"{stage}: batch_size {section['batch_size']} is not divisible by the {self.world} ranks "
                "(batch_size is the global batch)"
            )
        seed_everything(int(section["seed"]))
        self.optimizer = torch.optim.Adam(model.parameters(), lr=float(section["lr"]))
        warm = min(warmup, max(1, self.steps // 10))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.steps, warm))
        self.ema = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(model, avg_fn=ema_avg_fn(ema_decay), use_buffers=True)
        self.batcher = Batcher(n_data, int(section["batch_size"]), int(section["seed"]))
        self.ckpt_path = RunPaths.checkpoint(out_dir)
        self.log_path = out_dir / "train_log.csv"
        self.log_every, self.ckpt_every = int(section["log_every"]), int(section["checkpoint_every"])
        self.start, self.rows, self.elapsed_before = 0, [], 0.0
        self.window: dict[str, float] = {}
        self.window_n = 0
        self.guide: dict | None = None
        self.net = model
        self._t0 = time.perf_counter()

    def resume(self) -> None:
        """Load ``checkpoint.pt`` if it was made for this section and these args (else warn and
        start at step 0): weights, EMA, optimizer, schedule, RNG, step, log rows and window."""
        if not self.ckpt_path.exists():
            return
        state = ckpt_io.load(self.ckpt_path, map_location=self.device)
        if state.get("section") != self.section or state.get("args") != self.model_args:
            log.warning("%s: %s was made for another config; starting from step 0", self.stage, self.ckpt_path)
            return
        ckpt_io.load_state_dict_strict(self.model, state["model"], str(self.ckpt_path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        ckpt_io.set_rng_state(state["rng"])
        self.start, self.rows, self.elapsed_before = int(state["step"]), list(state["rows"]), float(state["elapsed_s"])
        self.window, self.window_n = dict(state["window"]), int(state["window_n"])
        self.guide = state.get("guide")
        log.info("%s: resumed from %s at step %d/%d", self.stage, self.ckpt_path, self.start, self.steps)

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rank :: self.world] if self.world > 1 else t

    def elapsed(self) -> float:
        """Training seconds so far, including earlier interrupted runs."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def save_checkpoint(self, step: int) -> None:
        """The full resume state after ``step`` steps (rank 0 writes; atomic)."""
        if self.rank != 0:
            return
        ckpt_io.save(
            self.ckpt_path,
            {
                "kind": self.kind,
                "args": self.model_args,
                "section": self.section,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": step,
                "rng": ckpt_io.rng_state(),
                "rows": self.rows,
                "window": dict(self.window),
                "window_n": self.window_n,
                "guide": self.guide,
                "elapsed_s": self.elapsed(),
            },
        )

    def step(self, step: int) -> None:
        """One optimizer step (batch ``step`` of the data order), then the EMA, the log row, the
        autoguidance guide and the periodic checkpoint when they are due."""
        idx = self.batcher(step).to(self.device)
        with autocast(self.device, self.bf16):
            loss, logs = self.compute_loss(self.net, idx, self._shard)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.window["loss"] = self.window.get("loss", 0.0) + float(loss.detach())
        for k, v in logs.items():
            self.window[k] = self.window.get(k, 0.0) + float(v)
        self.window_n += 1
        done = step + 1
        if done % self.log_every == 0 or done == self.steps:
            self._log_row(done)
        if self.guide_step is not None and done == self.guide_step:
            source = self.ema.module if self.ema is not None else self.model
            self.guide = {k: v.detach().clone() for k, v in source.state_dict().items()}
        if done % self.ckpt_every == 0 and done < self.steps:
            self.save_checkpoint(done)
            self._log_images(done)

    def _log_row(self, done: int) -> None:
        """Append the window's means to the log rows. Under DDP each rank has summed the loss of
        its own shard; the sums are all-reduced first, so a row holds the global batch's mean
        loss (what one process would log), not rank 0's half."""
        lr = self.scheduler.get_last_lr()[0]
        if self.world > 1 and self.window:
            keys = list(self.window)  # the same order on every rank: insertion order of the same code
            sums = torch.tensor([self.window[k] for k in keys], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(sums)
            self.window = {k: float(v) / self.world for k, v in zip(keys, sums.tolist())}
        row = {"step": done, "lr": lr, **{k: v / self.window_n for k, v in self.window.items()}}
        self.rows.append(row)
        if self.rank == 0:
            write_csv(self.log_path, self.rows)
        now = time.perf_counter()
        extra = {"steps_per_s": self.window_n / max(now - self._window_t0, 1e-9)}
        if self.ema is not None:
            n = float(self.ema.n_averaged)
            extra["ema_decay"] = min(float(self.ema_decay), (1.0 + n) / (10.0 + n))
        self._window_t0 = now
        self._tensorboard.scalars(done, {k: v for k, v in row.items() if k != "step"} | extra)
        self._progress.line(done, **{k: v for k, v in row.items() if k != "step"})
        self.window, self.window_n = {}, 0

    def _log_images(self, step: int) -> None:
        """The ``images`` callback's images to TensorBoard (rank 0, eval mode, no gradients)."""
        if self.images is None or self._tensorboard.writer is None:
            return
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            self._tensorboard.images(step, self.images())
        self.model.train(was_training)

    def _stop_requested(self, stop: StopSignals) -> bool:
        """A signal on any rank: every rank stops at the same step boundary (or one would wait
        forever in all-reduce), and for the same reason. The ranks agree on the strongest request
        (``max`` all-reduce of 0 none, 1 stop, 2 requeue): a rank that has not yet seen SLURM's
        pre-timeout signal still checkpoints-and-requeues with the others instead of exiting
        143 without requeueing."""
        requeue = requeue_signals()
        code = 0 if stop.requested is None else 2 if stop.requested in requeue else 1
        if self.world > 1:
            flag = torch.tensor([float(code)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = int(flag.item())
            if code == 2 and stop.requested not in requeue:
                stop.requested = int(requeue[0])
            elif code == 1 and stop.requested is None:
                stop.requested = int(signal.SIGTERM)
        return code > 0

    def run(self) -> TrainResult:
        """Resume, wrap for DDP, train to ``steps`` and return the :class:`TrainResult`.

        SIGTERM (and SLURM's pre-timeout signal inside a job) only sets a flag; the checkpoint is
        taken between two steps, and then the stage exits or is requeued.
        """
        self.resume()
        if self.data is not None:
            self.data.start(self.batcher, self.start, self.steps, self.rank, self.world, self.shard_loading)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self._t0 = self._window_t0 = time.perf_counter()
        self._progress = Progress(self.stage, self.steps, self.start)
        self._tensorboard = TensorBoard(self.tensorboard_folder, purge_step=self.start)
        self.model.train()
        with StopSignals() as stop, contextlib.closing(self._tensorboard):
            for step in range(self.start, self.steps):
                self.step(step)
                if self._stop_requested(stop) and step + 1 < self.steps:
                    self.save_checkpoint(step + 1)
                    if self.world > 1:  # no rank leaves before rank 0's checkpoint is on disk
                        torch.distributed.barrier()
                    log.warning(
                        "%s: signal %d received; checkpoint saved at step %d/%d in %s",
                        self.stage,
                        stop.requested,
                        step + 1,
                        self.steps,
                        self.ckpt_path,
                    )
                    stop.after_checkpoint()
            self.model.eval()
            self._log_images(self.steps)
        return TrainResult(
            ema=self.ema,
            rows=self.rows,
            elapsed_s=self.elapsed(),
            resumed_s=self.elapsed_before,
            final_loss=self.rows[-1]["loss"] if self.rows else float("nan"),
            guide=self.guide,
            steps=self.steps,
            batch_size=int(self.section["batch_size"]),
        )


def train_loop(**kwargs: Any) -> TrainResult:
    """``TrainLoop(**kwargs).run()``: the arguments of :class:`TrainLoop`."""
    return TrainLoop(**kwargs).run()


def save_model(
    path: Path,
    kind: str,
    model_args: Mapping,
    model: torch.nn.Module,
    ema=None,
    guide: dict | None = None,
    **extra: Any,
) -> None:
    """Write the final ``model.pt`` (raw weights, EMA weights if any, the autoguidance guide's
    weights ``guide`` if any, factory args, extras); rank 0 only under torch.distributed."""
    if dist_info()[0] != 0:
        return
    ckpt_io.save(
        path,
        {
            "kind": kind,
            "args": dict(model_args),
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "guide": guide,
            **extra,
        },
    )


def finish_stage(out_dir: Path) -> None:
    """Remove the resume checkpoint once ``model.pt`` is written (rank 0)."""
    if dist_info()[0] == 0:
        RunPaths.checkpoint(out_dir).unlink(missing_ok=True)


def finish_training(
    path: Path, kind: str, model_args: Mapping, model: torch.nn.Module, result: TrainResult, metrics: dict, **extra: Any
) -> None:
    """The common ending of every training stage: record ``resumed_wall_time_s`` and the
    throughput (``train_steps_per_s``, ``train_images_per_s``: global batch) in ``metrics``,
    write ``model.pt`` at ``path`` (weights, EMA and autoguidance guide of ``result``, the
    metrics so far, ``extra``) and remove the resume checkpoint of its folder."""
    metrics["resumed_wall_time_s"] = result.resumed_s
    if result.elapsed_s > 0 and result.steps:
        metrics["train_steps_per_s"] = round(result.steps / result.elapsed_s, 3)
        metrics.setdefault("train_images_per_s", round(result.steps * result.batch_size / result.elapsed_s, 1))
    save_model(path, kind, model_args, model, ema=result.ema, guide=result.guide, metrics=dict(metrics), **extra)
    finish_stage(Path(path).parent)


def drop_labels(
    labels: torch.Tensor, p: float, null_label: int, batch: int | None = None, shard: Callable | None = None
) -> torch.Tensor:
    """Label dropout for classifier-free guidance (Ho & Salimans 2022, Algorithm 1): each label of
    int (B,) ``labels`` is replaced by ``null_label`` with probability ``p`` (global torch RNG,
    so it is checkpointed and equal on every rank).

    Args:
        batch, shard: ``labels`` is this rank's shard (``shard(t) = t[rank::world]``) of a global
            batch of ``batch``: the draws are made for the whole batch and sharded, so every rank
            (and one process) draws alike.
    """
    if p <= 0:
        return labels
    drop = torch.rand((batch,) if batch is not None else labels.shape, device=labels.device) < p
    if shard is not None:
        drop = shard(drop)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def guide_step(section: Mapping) -> int | None:
    """The step at which the autoguidance guide is taken: ``guide_fraction`` (a fraction of
    ``steps``) times ``steps``, rounded, at least 1; None when ``guide_fraction`` is 0 or absent."""
    frac = float(section.get("guide_fraction") or 0.0)
    if frac <= 0:
        return None
    return max(1, min(int(section["steps"]), int(round(frac * int(section["steps"])))))


def checkpoint_steps(out_dir: Path, section: Mapping) -> int | None:
    """The ``steps`` of the resume checkpoint in ``out_dir`` when it was made for ``section``
    but for its ``steps`` (a stage that chooses its step count at run time, such as the
    pixel-space baseline timed against the latent model, keeps the count it chose); None when
    there is no such checkpoint."""
    path = RunPaths.checkpoint(out_dir)
    if not path.exists():
        return None
    state = ckpt_io.load(path, map_location="cpu")
    saved = dict(state.get("section", {}))
    if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in section.items() if k != "steps"}:
        return None
    return int(saved["steps"])


class TrainingStage:
    """The scaffold of every training stage: the prelude, the :class:`TrainLoop` and the
    epilogue written once (improved-diffusion's ``TrainLoop`` owns the loop; this owns the stage
    around it, as a Lightning module owns a model's data, loss and metrics).

    A stage subclass says what it builds, what it reads and how a batch becomes a loss:

    * ``name`` (the stage, as in the stage table), ``kind`` (the factory's model name) and
      ``section_name`` (its config section); ``float32`` for the judges, which train in
      float32 whatever ``bf16`` says (:mod:`pipeline.precision`);
    * :meth:`read` (data onto the device; returns the number of training examples),
      :meth:`model_args`, :meth:`compute_loss` (``TrainLoop``'s contract);
    * optional: :meth:`before_training` (after the model is built), :meth:`ema_decay`,
      :meth:`guide_step`, and after training :meth:`measure` (metrics),
      :meth:`checkpoint_extra` (more entries of ``model.pt``) and :meth:`summary` (a log line).

    :meth:`run`: stage record, device, :meth:`read`, seed, the model through the one factory,
    gradient checkpointing when the section asks, :meth:`before_training`, the loop, the
    stage's measurements, ``model.pt`` (:func:`finish_training`) and the log line.
    """

    name: str = ""
    kind: str = ""
    section_name: str = ""
    float32: bool = False
    #: whether ``compute_loss`` needs only this rank's shard of each batch (the stream path then
    #: loads only that); False where the whole batch is needed (augmentation drawn for all of it)
    shard_loading: bool = True
    #: the training rows (:class:`pipeline.streaming.StageData`), set by :meth:`read`
    data: Any = None

    def __init__(self, cfg: Mapping, run_dir, threads: int | None = None):
        self.cfg, self.paths, self.threads = cfg, RunPaths(run_dir), threads
        self.section = dict(cfg[self.section_name])
        self.out = self.paths.root / self.section_name

    # --- what a stage declares -----------------------------------------------------------------
    def read(self, device: torch.device) -> int:
        """Read the stage's data onto ``device`` (the training rows as :attr:`data`, see
        :meth:`stage_data`); the number of training examples."""
        raise NotImplementedError

    def stage_data(self, columns, device: torch.device):
        """The training rows of ``columns`` (:class:`pipeline.streaming.Column` by name) on the
        path ``data_loading`` chooses (memory while they fit, else streamed from HDF5), logged."""
        from pipeline.streaming import H5Rows, StageData, choose_path

        rows = H5Rows(columns)
        setting = str(self.cfg.get("data_loading", "auto"))
        path = choose_path(setting, rows.float32_bytes, device)
        log.info("%s: %d training rows, %s path (data_loading: %s)", self.name, len(rows), path, setting)
        workers = int(self.cfg.get("data_workers", 2))
        return StageData(columns, path, device, workers=workers, rows=rows)

    def model_args(self) -> dict:
        """The factory's keyword arguments (stored in ``model.pt`` as ``args``)."""
        raise NotImplementedError

    def compute_loss(self, net, idx: torch.Tensor, shard) -> tuple[torch.Tensor, dict]:
        """:class:`TrainLoop`'s ``compute_loss``: (scalar loss, dict of float tensors to log)."""
        raise NotImplementedError

    def before_training(self, model: torch.nn.Module, device: torch.device) -> None:
        """Called once the model is built, before the loop."""

    def ema_decay(self) -> float | None:
        return None

    #: {name: float (C, H, W) in [0, 1]} for TensorBoard at each checkpoint (None: no images)
    tensorboard_images: Callable[[], Mapping[str, torch.Tensor]] | None = None

    def guide_step(self) -> int | None:
        return None

    def measure(self, model: torch.nn.Module, result: TrainResult) -> dict:
        """The stage's numbers after training (added to ``metrics.json``)."""
        return {}

    def checkpoint_extra(self, result: TrainResult) -> dict:
        """More entries of ``model.pt`` (e.g. the diffusion schedule, the latent scaling)."""
        return {}

    #: the stage's closing log line, formatted with its metrics and ``folder`` (its folder's name)
    summary_format = "{folder}: done"

    def summary(self, metrics: Mapping) -> str:
        """The stage's closing log line (:attr:`summary_format`)."""
        return self.summary_format.format(folder=self.out.name, **metrics)

    @property
    def model_path(self) -> Path:
        return self.out / "model.pt"

    # --- the scaffold --------------------------------------------------------------------------
    def run(self) -> dict:
        """Train the stage and write its outputs; returns its metrics (``metrics.json``)."""
        from pipeline.models import build_model
        from pipeline.runtime import resolve_device, stage_record

        with stage_record(self.name, self.cfg, self.out, threads=self.threads) as metrics:
            device = resolve_device(self.cfg["device"])
            n_data = self.read(device)
            args = self.model_args()
            seed_everything(int(self.section["seed"]))
            model = build_model(self.kind, args).to(device)
            if "gradient_checkpointing" in self.section:  # memory for compute: docs/volumes.md
                model.enable_gradient_checkpointing(bool(self.section["gradient_checkpointing"]))
            self.before_training(model, device)
            result = train_loop(
                stage=self.name,
                model=model,
                kind=self.kind,
                model_args=args,
                section=self.section,
                compute_loss=self.compute_loss,
                n_data=n_data,
                out_dir=self.out,
                device=device,
                bf16=False if self.float32 else bool(self.cfg["bf16"]),
                ema_decay=self.ema_decay(),
                guide_step=self.guide_step(),
                tensorboard=self.out / "tensorboard" if self.cfg.get("tensorboard", True) else None,
                images=self.tensorboard_images,
                data=self.data,
                shard_loading=self.shard_loading,
            )
            if self.data is not None:
                self.data.close()
            metrics.update(self.measure(model, result))
            metrics.update(steps=self.section["steps"], train_seconds=round(result.elapsed_s, 2))
            finish_training(self.model_path, self.kind, args, model, result, metrics, **self.checkpoint_extra(result))
            log.info("%s", self.summary(metrics))
        return metrics
