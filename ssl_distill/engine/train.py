"""The DINO training loop: one step fits on a screen (cf. DINO's ``train_one_epoch``)."""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..atomic import remove_stale_temporaries
from ..checkpoints import (
    FORMAT, LATEST, CheckpointError, atomic_save, describe_mismatch, load_any_backbone, load_state_strict,
    read_training_checkpoint, rng_state, set_rng_state,
)
from ..config import Config, config_diff, config_from_dict, config_to_dict, save_config
from ..data.folder import BadImageCounter
from ..data.loader import build_train_loader
from ..errors import NonFiniteLossError  # defined without torch, for the command line; re-exported here
from ..models import SyncBatchNorm1d, default_fused_attn
from ..objectives import Reads, StepState, build_objectives
from ..runtime import autocast_context, check_precision, resolve_device, resolve_precision
from . import distributed as du
from .build import build_model
from .ema import ema_update
from .masks import StepMasks
from .monitor import CollapseMonitor, JsonlLogger
from .online_knn import OnlineKnn
from .schedules import Schedules, frozen_last_layer, total_iterations
from .stop import NAMES, REQUEUE, StopSignals


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weights get weight decay; biases and 1-d parameters (norms) do not (DINO's get_params_groups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_param(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """Scale each parameter's gradient to norm <= clip separately (DINO's ``clip_gradients``).

    Returns the pre-clip norms (P,).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).float()
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return norms


@dataclass
class RunState:
    """Where training stands: ``step`` iterations are done; the next batch is ``batch`` of ``epoch``.

    ``requeues`` counts the times a time-limit / preemption signal sent the job back to the queue.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    requeues: int = 0


class Trainer:
    """Owns the models, optimizer, loss and data of one run; ``fit()`` trains to the end."""

    def __init__(self, cfg: Config, fresh: bool = False, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        threads = cfg.run.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device or resolve_device(cfg.run.device)
        check_precision(self.device, cfg.run.precision)
        # rank 0's choice for every rank: "auto" times matmuls, and ranks must not train in different precisions
        self.precision = du.gather_objects(resolve_precision(self.device, cfg.run.precision))[0]
        if cfg.run.precision == "auto" and du.is_main():
            print(f"run.precision=auto: {self.precision} (bf16 matmuls are "
                  f"{'faster' if self.precision == 'bf16' else 'slower'} than fp32 on this {self.device.type})")
        self.world = du.world_size()
        self.rank = du.rank()
        np.random.seed(cfg.run.seed + self.rank)
        # a checkpoint we cannot resume from stops the run before anything is scanned, built or written
        resume_from = None if fresh else read_training_checkpoint(self.out / LATEST, self.out)

        created = du.is_main() and not self.out.exists()
        if du.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(self.out)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left in {self.out} by interrupted checkpoint "
                      f"saves ({sum(size for _, size in removed) / 2**20:.1f} MiB): "
                      f"{', '.join(path.name for path, _ in removed)}")
        du.barrier()
        try:
            self._build(fresh, resume_from)
        except BaseException:
            if created:  # a failed start leaves no half-made run directory behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise

    def _build(self, fresh: bool, resume_from: dict[str, Any] | None) -> None:
        """Data, schedules, models, optimizer and loss; then the checkpoint's state, if resuming."""
        cfg = self.cfg
        self.loader, self.sampler = build_train_loader(cfg, self.out / "filelist.json", self.rank, self.world)
        self.iters_per_epoch = self.sampler.batches_per_epoch
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} x {self.world} process(es) is larger than the "
                f"{len(self.loader.dataset)} images in {cfg.data.train_dir}"
            )
        self.total_steps = total_iterations(cfg.optim.epochs, self.iters_per_epoch)
        self.sched = Schedules.from_config(cfg, self.iters_per_epoch, self.world)

        if self.device.type == "cpu" and cfg.data.num_workers > 0 and du.is_main():
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            if torch.get_num_threads() + cfg.data.num_workers > cores:
                print(f"note: {torch.get_num_threads()} compute threads + {cfg.data.num_workers} data worker(s) on "
                      f"{cores} cores: workers will stall the compute threads; data.num_workers=0 is usually "
                      "faster on a small CPU")
        fused = cfg.model.fused_attn if cfg.model.fused_attn is not None else default_fused_attn(self.device)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.student = build_model(cfg, cfg.model.drop_path_rate, cfg.model.rope_rescale_coords).to(self.device)
        if cfg.model.init_from and resume_from is None:
            self._init_backbone(cfg.model.init_from)
        self.teacher = build_model(cfg, 0.0).to(self.device)  # no drop-path in the teacher
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.student.backbone.set_fused_attn(fused)
        self.teacher.backbone.set_fused_attn(fused)
        self.student_ddp: nn.Module = self.student
        if self.world > 1 and cfg.model.use_bn_in_head:
            # batch statistics over the global batch in both networks, as DINO: torch's SyncBatchNorm
            # on CUDA; it has no CPU kernel, so CPU processes all-reduce the statistics themselves
            convert = nn.SyncBatchNorm.convert_sync_batchnorm if self.device.type == "cuda" else SyncBatchNorm1d.convert
            self.student = convert(self.student)
            self.teacher = convert(self.teacher)
        if self.world > 1:
            self.student_ddp = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        torch.manual_seed(cfg.run.seed + self.rank)  # drop-path draws differ per rank, as DINO's per-rank seeds

        self.n_global = cfg.data.crops.n_global
        self.objectives = build_objectives(cfg).to(self.device)
        self.reads = Reads.union(o.reads for o in self.objectives)  # what the step builds
        self.patches = self.reads.patch_masks
        self.masks = StepMasks(cfg, self.rank, enabled=self.patches)
        self.loss_terms = [name for o in self.objectives for name in o.loss_terms]
        self.optimizer = torch.optim.AdamW(param_groups(self.student), betas=cfg.optim.betas)
        # fp16's loss scaler; disabled (scale, unscale_, update do nothing, step is optimizer.step) otherwise
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.run.precision == "fp16")
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.last_layer_params = [p for n, p in self.student.named_parameters() if "last_layer" in n]
        self.bad = BadImageCounter(cfg.data.max_bad_fraction)
        self.state = RunState()
        # the first objective's teacher that has collapse monitors is watched: [CLS] with DINO's term, else [OBJ]
        # (ODIS), else the patch targets (then through the shared head: the config refuses a separate one)
        self.watched = next(o.collapse_keys for o in self.objectives if o.collapse_keys)
        self.collapse = CollapseMonitor(cfg.model.out_dim, cfg.run.collapse_window)

        ckpt_path = self.out / LATEST
        if resume_from is not None:
            self._resume(resume_from, ckpt_path)
        elif du.is_main():
            if fresh and ckpt_path.exists():
                ckpt_path.unlink()
                (self.out / "log.jsonl").unlink(missing_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.logger = (
            JsonlLogger(self.out / "log.jsonl", self.out / "tensorboard" if cfg.run.tensorboard else None)
            if du.is_main()
            else None
        )
        self.online_knn = OnlineKnn(cfg, self.out, self.iters_per_epoch, self.total_steps, self.device, self.logger)
        boxes = getattr(self.loader.dataset, "boxes", None)
        if boxes is not None and self.logger is not None:  # ODIS: every kept, clipped and dropped box counted
            print(boxes.summary())
            self.logger.log({"kind": "boxes", "step": self.state.step, "file": str(cfg.data.boxes), **boxes.report})

    def _init_backbone(self, path: str) -> None:
        """Start the student's backbone (and so the teacher's) from ``path``; the file's mask token is
        kept only where this run has one (iBOT's ``masked_embed`` starts at zero when the file has none, as
        iBOT), and its position embedding is resampled to this run's patch grid when the sizes differ."""
        loaded = load_any_backbone(path, obj_token=self.student.backbone.has_obj_token)
        state = loaded.backbone.state_dict()
        ours = self.student.backbone.state_dict()
        if "masked_embed" in ours and "masked_embed" not in state:
            state["masked_embed"] = ours["masked_embed"] if loaded.mask_token is None else loaded.mask_token
        if "masked_embed" not in ours:
            state.pop("masked_embed", None)
        resampled = self.student.backbone.fit_pos_embed(state)  # a file trained at another image size
        if resampled and du.is_main():
            print(f"model.init_from: {resampled}")
        load_state_strict(self.student.backbone, state, f"model.init_from={path} ({loaded.format} backbone)")
        if du.is_main():
            print(f"backbone initialised from {path} ({loaded.format}, {loaded.source}); heads start fresh")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dict(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything a resume needs; ``rngs`` holds every rank's RNG states, in rank order."""
        return {
            "format": FORMAT,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.objective_state(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch": self.state.batch,
            "requeues": self.state.requeues,
            "world_size": self.world,
            "config": config_to_dict(self.cfg),
            "rngs": rngs,
            "bad_images": {"bad": self.bad.bad, "seen": self.bad.seen},
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes ``checkpoint.pth`` atomically (temporary name, then rename); all ranks call it.

        With several processes it first checks that every rank holds the same teacher (they must:
        identical all-reduced student updates), and gathers every rank's RNG states.
        """
        rngs = du.gather_objects(rng_state())
        if self.world > 1:
            self._check_teachers_agree()
        if du.is_main():
            ckpt = self.checkpoint_dict(rngs)
            atomic_save(ckpt, self.out / LATEST)
            k = self.cfg.run.keep_every_epochs
            if k and self.state.batch == 0 and self.state.epoch % k == 0 and self.state.step > 0:
                atomic_save(ckpt, self.out / f"checkpoint_epoch{self.state.epoch:04d}.pth")
        du.barrier()

    def _check_teachers_agree(self) -> None:
        """Every rank holds the same teacher parameters, buffers (BatchNorm running statistics) and
        DINO center; compared through (sum, sum of squares) in float64 of each of the three parts."""

        def digest(tensors: list[torch.Tensor]) -> tuple[float, float]:
            t = [x.detach().double() for x in tensors]
            return float(sum(x.sum() for x in t)), float(sum((x * x).sum() for x in t))

        with torch.no_grad():
            mine = {"parameters": digest(list(self.teacher.parameters())),
                    "buffers": digest(list(self.teacher.buffers())),
                    "centers": digest(list(self.objectives.buffers()))}
        digests = du.gather_objects(mine)
        differ = [k for k in mine if any(d[k] != digests[0][k] for d in digests)]
        if differ:
            raise RuntimeError(f"teacher {' and '.join(differ)} differ across ranks at step {self.state.step} "
                               f"((sum, sum of squares) per rank: {digests}); refusing to checkpoint")

    def objective_state(self) -> dict[str, torch.Tensor]:
        """Every objective's buffers (centers) in one flat dict: each buffer name is unique
        (``center``, ``patch_center`` ...), so a DINO checkpoint holds ``{"center": ...}`` as always."""
        state: dict[str, torch.Tensor] = {}
        for objective in self.objectives:
            state.update(objective.state_dict())
        return state

    def load_objective_state(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """The inverse of :meth:`objective_state`; names the buffers that do not match."""
        problem = describe_mismatch(self.objective_state(), state)
        if problem:
            raise CheckpointError(f"{path}: the objectives' buffers do not fit this config: {problem}")
        for objective in self.objectives:
            objective.load_state_dict({k: state[k] for k in objective.state_dict()})

    def _resume(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt.get("world_size", 1) != self.world:
            print(f"note: resuming a {ckpt['world_size']}-process run with {self.world} process(es); "
                  "the data order of the rest of the epoch changes")
        # the checkpoint's config with today's defaults for sections it predates, so only real changes show
        diff = config_diff(config_to_dict(config_from_dict(ckpt["config"])), config_to_dict(self.cfg))
        if diff and du.is_main():
            print("note: config differs from the checkpoint's:\n  " + "\n  ".join(diff))
        try:
            load_state_strict(self.student, ckpt["student"], f"{path}: student")
            load_state_strict(self.teacher, ckpt["teacher"], f"{path}: teacher")
        except CheckpointError as e:
            raise CheckpointError(f"{e}. The run directory holds another model: resume with its config "
                                  f"({self.out / 'config.yaml'}), or use another run.output_dir (or --fresh, "
                                  "which discards the checkpoint) to start a new run") from e
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.load_objective_state(ckpt["loss"], path)
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(
            step=ckpt["step"], epoch=ckpt["epoch"], batch=ckpt["batch"], requeues=ckpt.get("requeues", 0)
        )
        self.bad.bad, self.bad.seen = ckpt["bad_images"]["bad"], ckpt["bad_images"]["seen"]
        rngs = ckpt["rngs"] if "rngs" in ckpt else [ckpt["rng"]]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        if du.is_main():
            print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch})")

    # ------------------------------------------------------------------ one iteration
    def step_state(self, step: int) -> StepState:
        """The schedule values the objectives see at ``step``."""
        return StepState(step=step, epoch=step / self.iters_per_epoch,
                         teacher_temp=float(self.sched.teacher_temp[step]),
                         patch_teacher_temp=float(self.sched.patch_teacher_temp[step]))

    def step_inputs(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None,
                                                          list[torch.Tensor] | None, torch.Tensor | None]:
        """A loader batch's (crops, data masks, object masks, object validity) on the run's device: the
        arguments of :meth:`train_step` after ``step`` (None where the batch has no such entry)."""
        dev = self.device
        crops = [c.to(dev, non_blocking=True) for c in batch["crops"]]
        masks = [m.to(dev) for m in batch["masks"]] if "masks" in batch else None
        objects = [m.to(dev) for m in batch["obj_masks"]] if "obj_masks" in batch else None
        valid = batch["obj_valid"].to(dev) if "obj_valid" in batch else None
        return crops, masks, objects, valid

    def train_step(self, crops: list[torch.Tensor], step: int, data_masks: list[torch.Tensor] | None = None,
                   obj_masks: list[torch.Tensor] | None = None, obj_valid: torch.Tensor | None = None
                   ) -> dict[str, float]:
        """One iteration for every objective (cf. DINO's ``train_one_epoch``, iBOT's, DINOv2's):
        teacher outputs -> masks -> student outputs -> objectives' terms -> update -> EMA.

        ``data_masks``: per global view (B, P) iBOT masks from the data; ``obj_masks``: per view (B, P_v)
        object masks and ``obj_valid`` (B, V) from ODIS's object-aware crops (see ``data/object_crops.py``).
        The networks build what the objectives read (``self.reads``) and nothing else.
        """
        lr, wd, momentum = float(self.sched.lr[step]), float(self.sched.wd[step]), float(self.sched.momentum[step])
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the regularised group
                group["weight_decay"] = wd
        state = self.step_state(step)

        with autocast_context(self.device, self.precision):
            teacher_out = self.teacher(crops[: self.n_global], patches="targets" if self.patches else None,
                                       cls_attention=self.masks.needs_attention,
                                       obj_masks=None if obj_masks is None else obj_masks[: self.n_global],
                                       cls_head="cls" in self.reads.teacher)
            masks = self.masks(data_masks, teacher_out, state)  # None when no objective reads patch masks
            if masks is not None:
                teacher_out.update(self.teacher.patch_targets(teacher_out["patch_z"], masks))
            if obj_valid is not None:
                teacher_out["obj_valid"] = obj_valid  # which views hold each image's target object
            student_out = self.student_ddp(crops, masks=masks, patches="masked" if self.patches else None,
                                           obj_masks=obj_masks, cls_head="cls" in self.reads.student)
        terms = [objective.terms(student_out, teacher_out, masks, state) for objective in self.objectives]
        loss = sum(t.pop("loss") for t in terms)
        logged = {k: float(v.detach()) for t in terms for k, v in t.items()}
        if not math.isfinite(loss.item()):
            values = ", ".join(f"{k}={logged[k]:.4g}" for k in self.loss_terms)
            raise NonFiniteLossError(
                f"non-finite loss at step {step}: {values} (lr={lr:.3g}, teacher_temp={state.teacher_temp:.4g}, "
                f"wd={wd:.3g}); training stopped, the last good checkpoint is {self.out / LATEST}"
            )

        self._update_student(loss, step)
        ema_update(self.teacher, self.student, momentum)
        record = {"loss": loss.item(), **logged, "lr": lr, "wd": wd, "momentum": momentum,
                  "teacher_temp": state.teacher_temp}
        if self.patches:
            record["patch_teacher_temp"] = state.patch_teacher_temp
        return record

    def _update_student(self, loss: torch.Tensor, step: int) -> None:
        """The student's update from ``loss``: backward (scaled with fp16), DINO's per-parameter gradient
        clipping, the last layer's gradients dropped while it is frozen, the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients_per_param(self.trainable, self.cfg.optim.clip_grad)
        if frozen_last_layer(step, self.iters_per_epoch, self.sched.freeze_last_layer):
            for p in self.last_layer_params:
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``optim.epochs`` (or ``run.stop_at_step``); returns the last log record.

        A stop signal (see ``stop.py``) ends the loop after the current step with a checkpoint;
        the record then has ``stopped`` = ``"stop"``, ``"requeue"`` or ``"requeue-limit"``.
        """
        try:
            with StopSignals() as signals:
                return self._loop(signals)
        except Exception as e:
            if self.world > 1:  # say which rank and step; the others fail at their next collective
                print(f"rank {self.rank}: training failed at step {self.state.step}: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
            raise
        finally:
            if self.logger is not None:
                self.logger.close()

    def _loop(self, signals: StopSignals) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        stop_at = self.total_steps if cfg.run.stop_at_step is None else min(cfg.run.stop_at_step, self.total_steps)
        if st.batch >= self.iters_per_epoch:
            st.epoch, st.batch = st.epoch + 1, 0
        bar = tqdm(
            total=stop_at, initial=min(st.step, stop_at), disable=not (cfg.run.progress and du.is_main()),
            desc="train", unit="it", dynamic_ncols=True, mininterval=1.0,
        )
        last: dict[str, Any] = {"step": st.step, "epoch": st.epoch}
        window: list[dict[str, float]] = []
        t_window = time.perf_counter()
        images_per_step = cfg.data.batch_size * self.world
        fail_at = _injected_failure(self.rank)
        self.student.train()
        self.teacher.train()  # no dropout / drop-path in the teacher; matches DINO
        # online k-NN (monitor section) before the first step; its time stays out of images/s
        t_window += self.online_knn.maybe_evaluate(st.step, self.teacher.backbone)
        while st.step < stop_at:
            self.sampler.set_epoch(st.epoch)
            self.sampler.set_start_batch(st.batch)
            for batch in self.loader:
                step = st.step
                if step == fail_at:
                    raise RuntimeError(f"injected failure on rank {self.rank} at step {step} (SSL_DISTILL_FAIL_AT)")
                self.bad.update(int(batch["bad"]), len(batch["index"]))
                crops, *masks = self.step_inputs(batch)
                stats = self.train_step(crops, step, *masks)
                st.step += 1
                st.batch += 1
                window.append(stats)
                bar.update(1)
                end_of_epoch = st.batch == self.iters_per_epoch
                if st.step % cfg.run.log_every == 0 or end_of_epoch or st.step == stop_at:
                    elapsed = time.perf_counter() - t_window
                    last = self._log(window, elapsed, images_per_step)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", ep=st.epoch)
                    window, t_window = [], time.perf_counter()
                t_window += self.online_knn.maybe_evaluate(st.step, self.teacher.backbone)  # after this step
                if end_of_epoch:
                    st.epoch, st.batch = st.epoch + 1, 0
                request = signals.poll()
                if request and st.step < stop_at:  # checkpoint this step and leave (the last step just ends)
                    bar.close()
                    return self._stop(request, window, t_window, images_per_step, last)
                if end_of_epoch or st.step % cfg.run.checkpoint_every == 0 or st.step == stop_at:
                    self.save_checkpoint()
                if st.step >= stop_at or end_of_epoch:
                    break
        bar.close()
        self.bad.finalize()
        return last

    def _stop(self, request: int, window: list[dict[str, float]], t_window: float,
              images_per_step: int, last: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint the step that just finished and report why the loop ended."""
        if window:
            last = self._log(window, time.perf_counter() - t_window, images_per_step)
        stopped = NAMES[request]
        if request == REQUEUE:
            if self.state.requeues < self.cfg.run.max_requeues:
                self.state.requeues += 1
            else:
                stopped = "requeue-limit"
        self.save_checkpoint()
        if du.is_main():
            print(f"stopped at step {self.state.step} ({stopped}); checkpoint {self.out / LATEST} holds that step",
                  file=sys.stderr, flush=True)
        return {**last, "step": self.state.step, "stopped": stopped, "requeues": self.state.requeues}

    def _log(self, window: list[dict[str, float]], elapsed: float, images_per_step: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch}
        for k in window[0]:
            rec[k] = float(np.mean([w[k] for w in window]))
        for k in ("lr", "wd", "momentum", "teacher_temp"):
            rec[k] = window[-1][k]
        rec["images_per_s"] = len(window) * images_per_step / max(elapsed, 1e-9)
        rec["bad_images"] = self.bad.bad
        rec["time"] = time.time()
        entropy, kl_uniform = self.watched
        self.collapse.update(rec[entropy], rec[kl_uniform], self.state.step, len(window))
        if self.logger is not None:
            self.logger.log(rec)
        return rec


def _injected_failure(rank: int) -> int | None:
    """Test hook: ``SSL_DISTILL_FAIL_AT=RANK:STEP`` makes that rank raise before that step."""
    spec = os.environ.get("SSL_DISTILL_FAIL_AT")
    if not spec:
        return None
    r, step = (int(x) for x in spec.split(":"))
    return step if r == rank else None


def train(cfg: Config, fresh: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.run.output_dir``; returns the last log record.

    Joins the process group described by the environment (torchrun, ``srun``, submitit) first.
    """
    env = du.DistEnv.from_environ()
    with du.process_group(env, resolve_device(cfg.run.device), cfg.run.dist_timeout_min) as device:
        return Trainer(cfg, fresh=fresh, device=device).fit()
