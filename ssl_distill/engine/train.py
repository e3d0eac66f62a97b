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

from ..atomic import check_output_folder, missing_folders, remove_empty_folders, remove_stale_temporaries
from ..checkpoints import (
    FORMAT, LATEST, CheckpointError, atomic_save, describe_mismatch, load_state_strict, read_training_checkpoint,
    rng_state, set_rng_state,
)
from ..config import (
    Config, ConfigError, config_changes, config_from_dict, config_notes, config_to_dict, gram_ckpt_path, save_config,
)
from ..data.folder import BadImageCounter
from ..data.loader import build_train_loader
from ..data.masking import true_positions
from ..errors import NonFiniteLossError  # defined without torch, for the command line; re-exported here
from ..models import SyncBatchNorm1d, default_fused_attn
from ..objectives import Reads, StepState, build_objectives
from ..objectives.base import TeacherRows
from ..memory import keep_freed_memory
from ..runtime import autocast_context, check_precision, resolve_device, resolve_precision
from . import distributed as du
from .build import build_model, load_backbone_weights
from .compile import compile_blocks, compile_wins
from .ema import ema_update
from .gram_teacher import GramTeacher
from .masks import StepMasks, to_device
from .monitor import CollapseMonitor, JsonlLogger
from .online_knn import OnlineKnn
from .records import LogWindow, StepRecord, reduce_over_ranks
from .run_dir import move_earlier_run_aside
from .schedules import SCHEDULE_KEYS, Schedules, frozen_last_layer, total_iterations
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
        self.out = check_output_folder(cfg.run.output_dir, "run.output_dir")
        keep_freed_memory()  # the step's large tensors reuse freed memory instead of faulting in fresh pages
        threads = cfg.run.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device or resolve_device(cfg.run.device)
        check_precision(self.device, cfg.run.precision)
        self.world = du.world_size()
        self.rank = du.rank()
        np.random.seed(cfg.run.seed + self.rank)
        # a checkpoint we cannot resume from stops the run before anything is scanned, built or written
        resume_from = None if fresh else read_training_checkpoint(self.out / LATEST, self.out)
        self.config_changes = {} if resume_from is None else self._changes_since(resume_from)
        self.precision = self._choose_precision(resume_from)

        # the folders this start creates (the run directory, then any missing parent such as runs/): removed again
        # if the start fails
        self.created = missing_folders(self.out) if du.is_main() else []
        if du.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(self.out)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left in {self.out} by interrupted checkpoint "
                      f"saves ({sum(size for _, size in removed) / 2**20:.1f} MiB): "
                      f"{', '.join(path.name for path, _ in removed)}")
            if resume_from is None:
                self._move_earlier_run_aside(fresh)
        du.barrier()
        try:
            self._build(resume_from)
        except BaseException:
            self._discard_if_not_a_run()
            raise

    def _choose_precision(self, resume_from: dict[str, Any] | None) -> str:
        """The precision this run trains in: the config's, or for ``auto`` the one the run chose at its start
        (kept in the checkpoint: a timing taken on a busy machine must not switch a resumed run's precision),
        else rank 0's measurement for every rank (ranks must not train in different precisions)."""
        asked = self.cfg.run.precision
        kept = (resume_from or {}).get("precision")
        if asked == "auto" and kept is not None and (kept != "fp16" or self.device.type == "cuda"):
            if du.is_main():
                print(f"run.precision=auto: {kept}, as the run chose at its start")
            return kept
        precision = du.gather_objects(resolve_precision(self.device, asked))[0]
        if asked == "auto" and du.is_main():
            print(f"run.precision=auto: {precision} (bf16 matmuls are "
                  f"{'faster' if precision == 'bf16' else 'slower'} than fp32 on this {self.device.type})")
        return precision

    def _choose_compile(self, resume_from: dict[str, Any] | None) -> bool:
        """Whether this run compiles its blocks (:mod:`~ssl_distill.engine.compile`): ``on`` / ``off`` as asked
        (a resume may switch: the checkpoint's keys are the same), ``auto`` as the run chose at its start (kept
        in the checkpoint), else rank 0's measurement for every rank."""
        asked = self.cfg.run.compile
        kept = (resume_from or {}).get("compile")
        if asked != "auto":
            return asked == "on"
        if kept is not None:
            if du.is_main():
                print(f"run.compile=auto: {'on' if kept else 'off'}, as the run chose at its start")
            return kept
        measured = compile_wins(self.student.backbone, self.cfg.data.batch_size, self.cfg.data.crops.global_size,
                                self.precision) if du.is_main() else None
        wins, line = du.gather_objects(measured)[0]
        if du.is_main():
            print(f"run.compile=auto: {'on' if wins else 'off'} ({line} on this {self.device.type})")
        return wins

    def _move_earlier_run_aside(self, fresh: bool) -> None:
        """A new run starts with none of an earlier run's files under the names it writes (see ``run_dir.py``):
        with ``--fresh``, or after a start that failed before its first checkpoint."""
        moved = move_earlier_run_aside(self.out)
        if moved is None:
            return
        folder, names = moved
        why = "--fresh" if fresh else f"no {LATEST} to resume from in {self.out}"
        print(f"{why}: moved the earlier run's {', '.join(names)} into {folder}; this run starts at step 0")

    def _changes_since(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """This config's changes from the checkpoint's, ``{key: (old, new)}``; a change to what the run's schedule
        is computed from (:data:`SCHEDULE_KEYS`: batch size, lr, epochs ...) is refused before anything is built."""
        # the checkpoint's config with today's defaults for sections it predates, so only real changes show
        changes = config_changes(config_to_dict(config_from_dict(ckpt["config"])), config_to_dict(self.cfg))
        refused = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items() if key in SCHEDULE_KEYS]
        if refused:
            raise ConfigError(
                f"{self.out / LATEST} resumes a schedule that these settings define, so they cannot change "
                f"mid-run: {'; '.join(refused)}; resume with the run's values ({self.out / 'config.yaml'}), or "
                "start a new run with --fresh (the earlier run's files move aside) or another run.output_dir")
        return changes

    def _discard_if_not_a_run(self) -> None:
        """A start that fails before its first step leaves no run directory behind, where it created it."""
        state = getattr(self, "state", None)
        if self.created and (state is None or state.step == 0):
            shutil.rmtree(self.out, ignore_errors=True)
            remove_empty_folders(self.created[1:])  # its parents, while empty

    def _build(self, resume_from: dict[str, Any] | None) -> None:
        """Data, schedules, models, optimizer and loss; then the checkpoint's state, if resuming."""
        cfg = self.cfg
        # no Gram crops before the epoch of the Gram term's first step (its weight is 0 before gram.start_step)
        self.loader, self.sampler = build_train_loader(cfg, self.out / "filelist.json", self.rank, self.world,
                                                       gram_from_step=cfg.gram.start_step if cfg.gram.on else None)
        self.iters_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = total_iterations(cfg.optim.epochs, self.iters_per_epoch)
        self._check_steps_within_run()
        self.sched = Schedules.from_config(cfg, self.iters_per_epoch, self.world)

        if self.device.type == "cpu" and cfg.data.num_workers > 0 and du.is_main():
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            if torch.get_num_threads() + cfg.data.num_workers > cores:
                print(f"note: {torch.get_num_threads()} compute threads + {cfg.data.num_workers} data worker(s) on "
                      f"{cores} cores: workers will stall the compute threads; data.num_workers=0 is usually "
                      "faster on a small CPU")
        if du.is_main():
            for note in config_notes(cfg):
                print(f"note: {note}")
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
        # the teacher's patch head runs on every patch where a center reads their mean or BatchNorm their statistics;
        # else on the masked patches only (DINOv2's patch term)
        self.teacher_all_patches = self.patches and ("patch_mean" in self.reads.teacher
                                                     or not self.teacher.patch_head_rowwise)
        self.masks = StepMasks(cfg, self.rank, enabled=self.patches)
        self.loss_terms = [name for o in self.objectives for name in o.loss_terms]
        # Gram anchoring's frozen teacher, when the Gram term reads one (the live EMA teacher needs none)
        self.gram = GramTeacher(cfg, self.teacher.backbone) if "gram_patch" in self.reads.teacher else None
        if self.gram is not None and (resume_from is None or "gram" not in resume_from):
            self._start_gram_teacher(0 if resume_from is None else resume_from["step"])
        self.compiled = self._choose_compile(resume_from)
        if self.compiled:  # after the Gram teacher's copy of the teacher: it stays eager
            compile_blocks([self.student.backbone, self.teacher.backbone])
        # fused AdamW on CUDA (one kernel; its step counts live on the GPU, so no step reads them back, and
        # fp16's scaler hands it the inf check on the device); torch's default on the CPU (its step counts
        # are host tensors there; the CPU runs' numbers and checkpoints stay as they were)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), betas=cfg.optim.betas,
                                           fused=True if self.device.type == "cuda" else None)
        # fp16's loss scaler; disabled (scale, unscale_, update do nothing, step is optimizer.step) otherwise
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.run.precision == "fp16")
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        # optim.freeze_backbone_steps: one process builds no graph through the held-still backbone (its backward,
        # most of a step, is skipped; the heads' gradients are the same); DDP expects every trained parameter's
        # gradient each step, so with several processes the backward runs and the backbone's gradients are dropped
        self.skip_frozen_backward = self.world == 1
        self._backbone_trained = [p for p in self.student.backbone.parameters() if p.requires_grad]
        self.last_layer_params = [p for n, p in self.student.named_parameters() if "last_layer" in n]
        self.bad = BadImageCounter(cfg.data.max_bad_fraction)
        self.state = RunState()
        self.saved_step: int | None = None  # the step the checkpoint on disk holds (rank 0)
        # the first objective's teacher that has collapse monitors is watched: [CLS] with DINO's term, else [OBJ]
        # (ODIS), else the patch targets (then through the shared head: the config refuses a separate one)
        self.watched = next(o.collapse_keys for o in self.objectives if o.collapse_keys)
        self.collapse = CollapseMonitor(cfg.model.out_dim, cfg.run.collapse_window)

        if resume_from is not None:
            self._resume(resume_from, self.out / LATEST)
        if du.is_main():
            save_config(cfg, self.out / "config.yaml")  # the run's config as it goes on
        self.logger = (
            JsonlLogger(self.out / "log.jsonl", self.out / "tensorboard" if cfg.run.tensorboard else None)
            if du.is_main()
            else None
        )
        # a resume's accepted changes, on the record; run.stop_at_step is where each invocation stops, not a change
        changed = {key: list(values) for key, values in self.config_changes.items() if key != "run.stop_at_step"}
        if changed and self.logger is not None:
            self.logger.log({"kind": "config_change", "step": self.state.step, "changes": changed, "time": time.time()})
        self.online_knn = OnlineKnn(cfg, self.out, self.iters_per_epoch, self.total_steps, self.device, self.logger)
        boxes = getattr(self.loader.dataset, "boxes", None)
        if boxes is not None and self.logger is not None:  # ODIS: every kept, clipped and dropped box counted
            print(boxes.summary())
            self.logger.log({"kind": "boxes", "step": self.state.step, "file": str(cfg.data.boxes), **boxes.report})

    def _check_steps_within_run(self) -> None:
        """Step keys that would leave their part of the run out (the run's length is known once the folder is
        scanned): a Gram term that starts after the last step, a backbone frozen to the end."""
        cfg, total = self.cfg, self.total_steps
        length = (f"the run has {total} steps (optim.epochs={cfg.optim.epochs} x {self.iters_per_epoch} batches of "
                  f"{cfg.data.batch_size * self.world} images)")
        if total == 0:
            raise ConfigError(f"{length[0].upper()}{length[1:]}: nothing to train; raise optim.epochs")
        if cfg.gram.on and cfg.gram.start_step >= total:
            raise ConfigError(f"gram.start_step={cfg.gram.start_step} starts the Gram term after the last step: "
                              f"{length}; set gram.start_step (and the Gram teacher's steps) below {total}, or "
                              "train longer")
        if cfg.optim.freeze_backbone_steps and cfg.optim.freeze_backbone_steps >= total:
            raise ConfigError(f"optim.freeze_backbone_steps={cfg.optim.freeze_backbone_steps} holds the backbone "
                              f"still to the end: {length}; set it below {total} (a few percent of the run)")

    def _init_backbone(self, path: str) -> None:
        """Start the student's backbone (and so the teacher's) from ``path``; the file's mask token is
        kept only where this run has one (iBOT's ``masked_embed`` starts at zero when the file has none, as
        iBOT), and its position embedding is resampled to this run's patch grid when the sizes differ."""
        loaded, resampled = load_backbone_weights(self.student.backbone, path, f"model.init_from={path}")
        if du.is_main():
            if resampled:
                print(f"model.init_from: {resampled}")
            frozen = self.cfg.optim.freeze_backbone_steps
            print(f"backbone initialised from {path} ({loaded.format}, {loaded.source}); heads start fresh"
                  + (f", learning on the held-still backbone for its first {frozen} steps "
                     "(optim.freeze_backbone_steps)" if frozen else ""))

    def _start_gram_teacher(self, step: int) -> None:
        """The Gram teacher's first weights, for a run (or a resumed one that had none) starting at ``step``:
        the ``gram.ckpt`` file now, or the EMA teacher before step ``gram.it_load_ema_teacher``."""
        g = self.cfg.gram
        if g.ckpt is not None:
            note = self.gram.load_file(gram_ckpt_path(self.cfg))
            if du.is_main():
                print(note)
        elif g.it_load_ema_teacher < step:
            raise ConfigError(f"gram.it_load_ema_teacher={g.it_load_ema_teacher} takes the Gram teacher from the EMA "
                              f"teacher before that step, but this run resumes at step {step} without one: set it "
                              f"to {step} or later (and gram.start_step no earlier), or give gram.ckpt")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dict(self, rngs: list[dict[str, Any]], bad: tuple[int, int]) -> dict[str, Any]:
        """Everything a resume needs; ``rngs`` holds every rank's RNG states, in rank order, ``bad`` the
        unreadable and seen images summed over the ranks. A run with a frozen Gram teacher adds ``"gram"``
        (:meth:`GramTeacher.state_dict`)."""
        bad_images, seen = bad
        ckpt = {
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
            "precision": self.precision,
            "compile": self.compiled,
            "config": config_to_dict(self.cfg),
            "rngs": rngs,
            "bad_images": {"bad": bad_images, "seen": seen},
        }
        if self.gram is not None:
            ckpt["gram"] = self.gram.state_dict()
        return ckpt

    def save_checkpoint(self) -> None:
        """Rank 0 writes ``checkpoint.pth`` atomically (temporary name, then rename); all ranks call it.

        With several processes it first checks that every rank holds the same teacher (they must:
        identical all-reduced student updates), and gathers every rank's RNG states and image counts.
        """
        gathered = du.gather_objects((rng_state(), self.bad.bad, self.bad.seen))
        if self.world > 1:
            self._check_teachers_agree()
        if du.is_main():
            ckpt = self.checkpoint_dict([g[0] for g in gathered], (sum(g[1] for g in gathered),
                                                                   sum(g[2] for g in gathered)))
            atomic_save(ckpt, self.out / LATEST)
            self.saved_step = self.state.step
            k = self.cfg.run.keep_every_epochs
            if k and self.state.batch == 0 and self.state.epoch % k == 0 and self.state.step > 0:
                atomic_save(ckpt, self.out / f"checkpoint_epoch{self.state.epoch:04d}.pth")
        du.barrier()
        self.saved_step = self.state.step  # every rank, once rank 0 has written it

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
        diff = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in self.config_changes.items()]
        if diff and du.is_main():
            print("note: config differs from the checkpoint's:\n  " + "\n  ".join(diff))
        try:
            load_state_strict(self.student, ckpt["student"], f"{path}: student")
            load_state_strict(self.teacher, ckpt["teacher"], f"{path}: teacher")
        except CheckpointError as e:
            raise CheckpointError(f"{e}. The run directory holds another model: resume with its config "
                                  f"({self.out / 'config.yaml'}), or use another run.output_dir (or --fresh, "
                                  "which moves the earlier run's files aside) to start a new run") from e
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # this device's kernel, whichever device wrote the file
            group["fused"] = self.optimizer.defaults["fused"]
        self.load_objective_state(ckpt["loss"], path)
        if self.gram is not None and "gram" in ckpt:
            self.gram.load_state_dict(ckpt["gram"], str(path))
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(
            step=ckpt["step"], epoch=ckpt["epoch"], batch=ckpt["batch"], requeues=ckpt.get("requeues", 0)
        )
        self.saved_step = self.state.step
        if self.rank == 0:  # the checkpoint holds every rank's count; the log sums the ranks' counts
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
                         patch_teacher_temp=float(self.sched.patch_teacher_temp[step]),
                         gram_weight=float(self.sched.gram_weight[step]),
                         dino_local_weight=float(self.sched.dino_local_weight[step]))

    def step_inputs(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None,
                                                          list[torch.Tensor] | None, torch.Tensor | None,
                                                          list[torch.Tensor] | None]:
        """A loader batch's (crops, data masks, object masks, object validity, Gram crops): the arguments of
        :meth:`train_step` after ``step`` (None where the batch has no such entry), on the run's device but
        the data masks and the object validity, which the step reads on the host first (where their True
        entries are counted without waiting for a GPU) and then moves, and the Gram crops, which the step
        moves only where the Gram term runs (before ``gram.start_step`` nothing reads them)."""
        dev = self.device
        crops = [c.to(dev, non_blocking=True) for c in batch["crops"]]
        masks = batch.get("masks")
        objects = [m.to(dev, non_blocking=True) for m in batch["obj_masks"]] if "obj_masks" in batch else None
        valid = batch.get("obj_valid")
        return crops, masks, objects, valid, batch.get("gram_crops")

    def train_step(self, crops: list[torch.Tensor], step: int, data_masks: list[torch.Tensor] | None = None,
                   obj_masks: list[torch.Tensor] | None = None, obj_valid: torch.Tensor | None = None,
                   gram_crops: list[torch.Tensor] | None = None) -> StepRecord:
        """One iteration for every objective (cf. DINO's ``train_one_epoch``, iBOT's, DINOv2's, DINOv3's):
        teacher outputs -> masks -> student outputs -> objectives' terms -> update -> EMA (-> Gram teacher).

        ``data_masks``: per global view (B, P) iBOT masks from the data; ``obj_masks``: per view (B, P_v)
        object masks and ``obj_valid`` (B, V) from ODIS's object-aware crops (see ``data/object_crops.py``);
        ``gram_crops``: per global view (B, 3, g, g), the frozen Gram teacher's input (moved here). The networks build
        what the objectives read (``self.reads``) and nothing else; the Gram teacher runs only while the
        Gram term's weight is above 0.

        The step waits for the device once, to check that the loss is finite (AttMask once more: its masks
        are drawn on the host from the teacher's attention); the returned record keeps the terms on the device
        until a value is read (:class:`~ssl_distill.engine.records.StepRecord`).
        """
        lr, wd, momentum = float(self.sched.lr[step]), float(self.sched.wd[step]), float(self.sched.momentum[step])
        held = self.cfg.optim.freeze_backbone_steps
        frozen = step < held  # the backbone of both stays the file's
        if self.skip_frozen_backward and step <= held:  # the held steps, and the one that lets it go
            for p in self._backbone_trained:
                p.requires_grad_(not frozen)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the regularised group
                group["weight_decay"] = wd
        state = self.step_state(step)
        if self.gram is not None and self.gram.before_step(step, self.teacher.backbone):
            self._gram_event(step, "snapshot")

        with autocast_context(self.device, self.precision):
            teacher_out = self.teacher(crops[: self.n_global], patches="targets" if self.teacher_all_patches else None,
                                       cls_attention=self.masks.needs_attention,
                                       obj_masks=None if obj_masks is None else obj_masks[: self.n_global],
                                       cls_head="cls" in self.reads.teacher,
                                       patch_tokens=(self.patches and not self.teacher_all_patches)
                                       or "patch_global" in self.reads.teacher)
            # None when no objective reads patch masks; the masked patches' positions counted on the host
            masks, positions = self.masks.build(data_masks, teacher_out, state, self.device) or (None, None)
            if masks is not None:
                teacher_out.update(self.teacher.patch_targets(teacher_out["patch_z"], masks, positions)
                                   if self.teacher_all_patches else
                                   self.teacher.masked_patch_targets(teacher_out["patch_global"], masks, positions))
            if obj_valid is not None:  # which views hold each image's target object; the valid teacher rows
                teacher_out["obj_valid"] = to_device(obj_valid, self.device)
                teacher_out["obj_valid_rows"] = to_device(true_positions(obj_valid[:, : self.n_global].t()),
                                                          self.device)
            student_out = self.student_ddp(crops, masks=masks, patches="masked" if self.patches else None,
                                           obj_masks=obj_masks, cls_head="cls" in self.reads.student,
                                           patch_tokens="patch_global" in self.reads.student,
                                           n_global=self.n_global,  # the masks are the global views' only
                                           mask_positions=positions)
            if self.gram is not None and state.gram_weight > 0:
                if gram_crops is None:
                    raise ValueError("the Gram teacher reads the batch's Gram crops: set data.crops.gram_size")
                teacher_out["gram_patch"] = self.gram.patches([c.to(self.device, non_blocking=True)
                                                               for c in gram_crops])
        terms = [objective.terms(student_out, teacher_out, masks, state) for objective in self.objectives]
        loss = sum(t.pop("loss") for t in terms)
        schedule = {"lr": lr, "wd": wd, "momentum": momentum, "teacher_temp": state.teacher_temp}
        if self.patches:
            schedule["patch_teacher_temp"] = state.patch_teacher_temp
        if self.cfg.gram.on:
            schedule.update(gram_weight=state.gram_weight, dino_local_weight=state.dino_local_weight)
        loss_value = loss.item()  # the step's one wait for the device
        record = StepRecord({"loss": loss_value, **{k: v.detach() for t in terms for k, v in t.items()
                                                      if not isinstance(v, TeacherRows)}},
                            schedule, {k: v for t in terms for k, v in t.items() if isinstance(v, TeacherRows)})
        if not math.isfinite(loss_value):  # the terms are read only now
            values = ", ".join(f"{k}={record[k]:.4g}" for k in self.loss_terms if k in record)
            kept = (f"the last good checkpoint is {self.out / LATEST}" if (self.out / LATEST).is_file() else
                    f"no checkpoint was written yet (run.checkpoint_every={self.cfg.run.checkpoint_every})")
            raise NonFiniteLossError(
                f"non-finite loss at step {step}: {values} (lr={lr:.3g}, teacher_temp={state.teacher_temp:.4g}, "
                f"wd={wd:.3g}); training stopped, {kept}"
            )

        self._update_student(loss, step, frozen)
        ema_update(self.teacher, self.student, momentum, skip="backbone" if frozen else None)
        if self.gram is not None and self.gram.after_step(step, self.teacher.backbone):
            self._gram_event(step, "refresh")
        return record

    def _gram_event(self, step: int, event: str) -> None:
        """One ``"kind": "gram_teacher"`` log record: the Gram teacher took the EMA teacher's weights before
        step ``step`` (``"snapshot"``) or after it (``"refresh"``, with the count so far)."""
        if self.logger is not None:
            self.logger.log({"kind": "gram_teacher", "step": step, "event": event, "refreshes": self.gram.refreshes,
                             "time": time.time()})

    def _update_student(self, loss: torch.Tensor, step: int, frozen_backbone: bool = False) -> None:
        """The student's update from ``loss``: backward (scaled with fp16), DINO's per-parameter gradient
        clipping, the last layer's gradients dropped while it is frozen (and the backbone's with
        ``frozen_backbone``: AdamW then leaves those parameters, weight decay included, and their moments as
        they are), the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad or not frozen_backbone:  # held still: no graph when only its outputs are read
            self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients_per_param(self.trainable, self.cfg.optim.clip_grad)
        if frozen_last_layer(step, self.iters_per_epoch, self.sched.freeze_last_layer):
            for p in self.last_layer_params:
                p.grad = None
        if frozen_backbone:
            for p in self.student.backbone.parameters():
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``optim.epochs`` (or ``run.stop_at_step``); returns the last log record.

        A stop signal (see ``stop.py``) ends the loop after the current step with a checkpoint;
        the record then has ``stopped`` = ``"stop"``, ``"requeue"`` or ``"requeue-limit"`` and ``signal``
        (``"SIGTERM"`` ...).
        """
        ended = False
        try:
            with StopSignals() as signals:
                last = self._loop(signals)
            ended = True
            return last
        except Exception as e:
            if self.world > 1:  # say which rank and step; the others fail at their next collective
                print(f"rank {self.rank}: training failed at step {self.state.step}: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
            raise
        except KeyboardInterrupt:  # a second Ctrl-C (stop.py), perhaps in a checkpoint write: say what is on disk
            held = ("no checkpoint was written yet" if self.saved_step is None else
                    f"{self.out / LATEST} holds step {self.saved_step}")
            raise KeyboardInterrupt(f"training stopped at once after {self.state.step} steps; {held}") from None
        finally:
            if self.logger is not None:
                self.logger.close()
            if not ended:  # e.g. the first step does not fit in memory: its step-0 k-NN record goes too
                self._discard_if_not_a_run()

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
        window = LogWindow()
        t_window = time.perf_counter()
        images_per_step = cfg.data.batch_size * self.world
        fail_at = _injected_failure(self.rank)
        warm_up = self.compiled
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
                t_step = time.perf_counter()
                stats = self.train_step(crops, step, *masks)
                if warm_up and du.is_main():
                    print(f"run.compile: the first step took {time.perf_counter() - t_step:.1f} s (its graphs "
                          "compiled, once per process)", flush=True)
                warm_up = False
                st.step += 1
                st.batch += 1
                window.append(stats)
                bar.update(1)
                end_of_epoch = st.batch == self.iters_per_epoch
                if st.step % cfg.run.log_every == 0 or end_of_epoch or st.step == stop_at:
                    elapsed = time.perf_counter() - t_window
                    last = self._log(window, elapsed, images_per_step)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", ep=st.epoch)
                    window, t_window = LogWindow(), time.perf_counter()
                t_window += self.online_knn.maybe_evaluate(st.step, self.teacher.backbone)  # after this step
                if end_of_epoch:
                    st.epoch, st.batch = st.epoch + 1, 0
                request = signals.poll()
                if request and st.step < stop_at:  # checkpoint this step and leave (the last step just ends)
                    bar.close()
                    return self._stop(request, signals.signal_name(request), window, t_window, images_per_step, last)
                if end_of_epoch or st.step % cfg.run.checkpoint_every == 0 or st.step == stop_at:
                    self.save_checkpoint()
                if st.step >= stop_at or end_of_epoch:
                    break
        bar.close()
        self.bad.finalize()
        return last

    def _stop(self, request: int, signal_name: str, window: LogWindow, t_window: float,
              images_per_step: int, last: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint the step that just finished and report why the loop ended (and on which signal)."""
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
        return {**last, "step": self.state.step, "stopped": stopped, "signal": signal_name,
                "requeues": self.state.requeues}

    def _log(self, window: LogWindow, elapsed: float, images_per_step: int) -> dict[str, Any]:
        """The log line of the steps in ``window`` (read from the device now, in one transfer): each value's
        mean over the steps that computed it (a monitor that a step did not compute: no masked patch, no
        valid [OBJ] view, the Gram terms before their start, is absent from its record, and left out of the
        line when no step did); schedule values at the window's last step. With several processes the loss
        terms and monitors are those of the global batch and ``bad_images`` counts every rank's
        (:mod:`~ssl_distill.engine.records`); ``images_per_s`` is always global: every rank's images per
        second of rank 0's wall-clock."""
        rec: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch}
        means, steps = window.means()
        counters = {"bad_images": self.bad.bad}
        if self.world > 1:
            reduced, reduced_steps, counters = reduce_over_ranks(window, self.device, counters)
            means.update(reduced)
            steps.update(reduced_steps)
            counters["bad_images"] = int(counters["bad_images"])
        rec.update(means)
        rec.update(window.schedule())
        rec["images_per_s"] = len(window) * images_per_step / max(elapsed, 1e-9)
        rec.update(counters)
        rec["time"] = time.time()
        entropy, kl_uniform = self.watched
        if entropy in rec:
            self.collapse.update(rec[entropy], rec[kl_uniform], self.state.step, steps[entropy])
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
