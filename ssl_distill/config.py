"""Typed configuration: dataclasses, YAML recipes, dotted command-line overrides, strict keys."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write


@dataclass
class CropsConfig:
    """Multi-crop views, DINO's defaults (Caron et al. 2021, Sec. 3.1 and main_dino.py).

    Global views get blur with probability ``blur_p[0]`` (first) / ``blur_p[1]`` (second) and the
    second global view is solarized with ``solarize_p``; local views are blurred with ``blur_p[2]``.
    """

    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 10
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # second global view only
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # ODIS object-aware cropping (with data.boxes; see data/object_crops.py)
    min_object_cover: float = 0.04  # a crop holds an object when the object's visible part covers this much of it
    min_object_inside: float = 0.0  # global crops also hold this share of the target box's area (1: the whole
    # box, the project page's "until both crops contain the box"); 0: min_object_cover alone, as before
    object_dominant: bool = False  # global crops also show more of the target box than of any other box
    object_aware_local: bool = False  # local crops redrawn until they hold the target too; [OBJ] then sees its box
    # Gram anchoring's teacher crops (see the gram section): each global view's box and flip again at this size
    gram_size: int | None = None  # null: none (official crops.gram_teacher_crops_size; 512 for 256 in the 7B stage)
    gram_no_distortions: bool = True  # normalised only, no jitter / blur / solarize (official crops.
    # gram_teacher_no_distortions: true in the 7B Gram stage, false by default); false: the global view's photometry


@dataclass
class DataConfig:
    """Training images: a folder of images at any nesting (class subfolders are not needed)."""

    train_dir: str = "data/train"
    batch_size: int = 64  # per process; DINO: 64 per GPU x 16 GPUs
    num_workers: int = 2
    # decoded images kept in memory (MB per training process, shared out among its loader's workers): a folder
    # that fits is decoded once per run, not once per epoch; 0: none (data/folder.py DecodedImages)
    cache_mb: int = 1024
    max_bad_fraction: float = 0.01
    boxes: str | None = None  # COCO-style boxes file of train_dir (as `ssl-distill discover` writes); null: no object views
    crops: CropsConfig = field(default_factory=CropsConfig)


@dataclass
class ModelConfig:
    """ViT backbone (timm) and DINO head."""

    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_huge | vit_giant
    patch_size: int = 16
    img_size: int = 224  # size the position embedding is stored at; other sizes are interpolated
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    # Architecture variants (official DINOv2 / iBOT releases; see models/backbone.py). Defaults: DINO's ViT.
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim (SwiGLU: the packed width of fc1)
    mlp_layer: str = "mlp"  # mlp (GELU) | swiglu (DINOv2 ViT-g)
    qkv_bias: bool = True
    layer_scale: float | None = None  # layer-scale init value; None: no layer scale
    reg_tokens: int = 0  # register tokens (DINOv2 _reg4 models: 4)
    no_embed_class: bool = False  # position embedding for patches only (models with registers)
    pos_interp: str = "timm"  # position-embedding interpolation: timm | dino (DINO/iBOT/DINOv2 without registers)
    # learned (a ViT with a learned position embedding: DINO, iBOT, DINOv2) | rope (DINOv3: axial RoPE on the
    # patches, timm's Eva; with reg_tokens 4, layer_scale 1e-5 as the releases; see models/rope_backbone.py)
    pos_embed: str = "learned"
    rope_theta: float = 100.0  # RoPE period base (pos_embed rope; DINOv3 calls it base: 100; timm: temperature)
    rope_rescale_coords: float | None = 2.0  # RoPE coordinates x one factor in [1/R, R] while training, student
    # only (pos_embed rope; DINOv3: 2); null: none
    norm_eps: float | None = None  # LayerNorm eps (pos_embed rope); null: DINOv3's 1e-5
    drop_path_rate: float = 0.1  # student only; the teacher has none
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    fused_attn: bool | None = None  # None: fused on CUDA, plain matmul-softmax on CPU
    # backbone weights a new run starts from (an official DINO / iBOT / DINOv2 file or one of our runs;
    # an ODIS run's [OBJ] token starts as the file's [CLS]); heads start fresh. null: random init
    init_from: str | None = None


@dataclass
class DinoLossConfig:
    """DINO loss temperatures and centering (Caron et al. 2021)."""

    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0  # also the patch term's warmup, as iBOT
    center_momentum: float = 0.9
    weight: float = 1.0  # the [CLS] term's weight (iBOT's lambda1)
    centering: str = "ema"  # ema (DINO, iBOT) | sinkhorn_knopp (DINOv2, 3 iterations)
    koleo_weight: float = 0.0  # DINOv2's KoLeo regularizer on the student's CLS features (0.1 in DINOv2)


@dataclass
class IbotConfig:
    """iBOT's masked patch term (Zhou et al. 2022): off while ``weight`` is 0 (a DINO run).

    The masks come from the ``masking`` section; the head is the CLS head (``shared_head``, as the
    released recipes) or a separate patch head with ``patch_out_dim`` prototypes (DINOv2's separate
    iBOT head: its own MLP and last layer, in student and teacher).
    """

    weight: float = 0.0  # lambda2; 1.0 in iBOT's recipes
    teacher_temp: float = 0.07  # iBOT's teacher_patch_temp
    warmup_teacher_temp: float = 0.04  # iBOT's warmup_teacher_patch_temp (warmup epochs: dino's)
    center_momentum: float = 0.9  # iBOT's center_momentum2
    centering: str = "ema"  # ema (iBOT) | sinkhorn_knopp (DINOv2)
    shared_head: bool = True
    patch_out_dim: int = 8192  # prototypes of the separate patch head (shared_head false)


ODIS_TARGET_BOX: tuple[str, ...] = ("sample", "largest")  # odis.target_box's values (data/object_crops.py reads them)
ODIS_NO_BOX: tuple[str, ...] = ("none", "whole_image")  # odis.no_box's
ODIS_ABLATIONS: tuple[str, ...] = ("none", "cropping_only", "masking_only")  # odis.ablation's


@dataclass
class OdisConfig:
    """ODIS's object term (Hızlı et al. 2025): off while ``weight`` is 0.

    The [OBJ] token goes through the CLS head (one shared head), with its own center and the
    [CLS] teacher's temperature schedule; boxes come from ``data.boxes``.
    """

    weight: float = 0.0  # the [OBJ] term's weight; 1.0 in the ODIS recipes
    center_momentum: float = 0.9
    # ODIS's sources (see models/backbone.py and data/object_crops.py for what was read):
    patches_read_obj: bool = True  # [CLS], registers, patches read [OBJ]: the project page masks only the [OBJ] row
    obj_reads_cls: bool = False  # [OBJ] reads [CLS]: the project page has [OBJ] read object patches only
    target_box: str = "sample"  # sample: a box drawn first, then the crops (project page) | largest: of the 1st crop
    no_box: str = "none"  # an image without a box: none (no object term) | whole_image ([OBJ] on every patch)
    # the paper's two ablations (abstract: "object-aware cropping and masked attention"): none | cropping_only
    # (object-aware crops for the [CLS] term, no [OBJ]: odis.weight 0, dino.weight > 0) | masking_only (plain crops,
    # [OBJ] on the sampled target's box in every view that shows it)
    ablation: str = "none"

@dataclass
class GramConfig:
    """Gram anchoring (Siméoni et al. 2025, DINOv3; ``objectives/gram.py``): off while ``weight`` is 0.

    The student's patch similarities (Gram matrix) of the global views are pulled towards a Gram
    teacher's: the live EMA teacher (``ema_teacher``), or a frozen backbone from a file (``ckpt``) or taken
    from the EMA teacher before step ``it_load_ema_teacher``, refreshed from it every ``update_frequency``
    steps from step ``it_first_update`` on, at most ``max_updates`` times. A separate Gram teacher reads
    its own crops at ``data.crops.gram_size``. The weight is 0 before ``start_step``, rises along a half
    cosine over ``ramp_steps`` and stays at ``weight``; the DINO term's local-crop pairs go from weight 1
    to ``dino_local_weight`` along the same ramp. Steps count iterations, as the official keys do.
    """

    weight: float = 0.0  # after the ramp (official gram.loss_weight_schedule end / loss_weight; 2.0 in the 7B stage)
    start_step: int = 0  # weight 0 before it (official schedule warmup, start = peak = 0; 1,000,000 in the 7B stage)
    ramp_steps: int = 0  # half-cosine ramp 0 -> weight (official schedule cosine_epochs x epoch length; 1,000)
    dino_local_weight: float = 1.0  # DINO's local-crop pairs after the ramp (official dino.reweight_dino_local_loss
    # with local_loss_weight_schedule end; 0.5 in the 7B stage); 1 leaves the DINO term as it is
    img_level: bool = True  # one Gram matrix per image (official gram.img_level: true in the 7B stage, default
    # false); false: one matrix over every global view of the batch
    normalized: bool = True  # L2-normalise the patch features first (official gram.normalized)
    remove_neg: bool = False  # clamp both matrices' negative entries to 0 (official gram.remove_neg)
    remove_only_teacher_neg: bool = False  # clamp the teacher's only (official gram.remove_only_teacher_neg)
    ema_teacher: bool = False  # the live EMA teacher on the same global views, no extra model (official same name)
    ckpt: str | None = None  # Gram teacher backbone file or run directory (official gram.ckpt); any file
    # model.init_from reads (ours, official DINO / iBOT / DINOv2 / DINOv3); "model.init_from": that key's file
    # (a run continued from released weights keeps them as its Gram teacher)
    it_load_ema_teacher: int = -1  # copy the EMA teacher in before this step; -1: never (official same name)
    update_frequency: int = 0  # refresh from the EMA teacher after every N-th step; 0: never (official
    # gram.update_frequency with gram.rep_update; 10,000 in the 7B stage)
    it_first_update: int = 0  # no refresh before this step (official gram.it_first_update; 1,010,000 in the 7B stage)
    max_updates: int | None = None  # at most this many refreshes; null: no limit (official gram.max_updates; 3)
    compute_stats: bool = False  # also log the batch-level Gram loss on masked / unmasked patches (official
    # gram.compute_stats: stats_only/masked_gram_loss, unmasked_gram_loss)

    @property
    def on(self) -> bool:
        """Whether the run trains with the Gram term."""
        return self.weight > 0


#: ``gram.ckpt``'s value for "the file model.init_from names" (the Gram teacher is the backbone the run starts from)
GRAM_CKPT_FROM_INIT = "model.init_from"


@dataclass
class OptimConfig:
    """AdamW with DINO's schedules; every schedule is evaluated per iteration."""

    epochs: float = 100  # a fractional count ends mid-epoch (runs compared at one wall-clock budget)
    lr: float = 0.0005  # at batch 256; scaled by total batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient norm clip (DINO's way); 0 disables
    freeze_last_layer: float = 1  # epochs during which the head's last layer gets no update
    freeze_backbone_steps: int = 0  # first steps in which the backbone gets no update and the fresh heads learn
    # on its features (a run from model.init_from; the teacher's backbone stays the file's); 0: none
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class KnnConfig:
    """k-NN evaluation (Wu et al. 2018 weighted voting, as DINO's eval_knn.py)."""

    train_dir: str = ""
    val_dir: str = ""
    image_size: int = 224
    resize_size: int = 256
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    batch_size: int = 128
    num_workers: int = 2
    precision: str = "fp32"  # feature extraction: fp32 (as DINO's eval_knn / eval_linear) | bf16 (fast) | fp16 (CUDA)

    def __post_init__(self) -> None:
        # checked here, not in validate(): evaluations read a run's config without validate()
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"knn.precision must be fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class MonitorConfig:
    """Online k-NN: the teacher evaluated while training runs, on a fixed, seeded subset of a labeled folder.

    Off while both intervals are 0. Evaluations run after step ``n * knn_every_steps`` (or after the
    step closest to ``n * knn_every_epochs`` epochs), at the run's last step, and before the first
    step (``knn_at_start``); each writes one ``"kind": "knn"`` record to ``log.jsonl``. The subsets
    (``knn_train_size`` / ``knn_val_size`` images, 0 = the whole folder) are drawn once with
    ``knn_seed``; k values and temperature come from the ``knn`` section, as do the folders unless
    ``knn_train_dir`` / ``knn_val_dir`` are set. Training is not disturbed: the run ends bit-identical
    to one without online k-NN (see :mod:`ssl_distill.engine.online_knn`).
    """

    knn_every_epochs: float = 0.0  # 0: off; e.g. 0.5 evaluates twice per epoch
    knn_every_steps: int = 0  # 0: off; the alternative to knn_every_epochs
    knn_at_start: bool = True  # also evaluate before the first step (the random-init point of the curve)
    knn_train_dir: str = ""  # labeled folder; default: knn.train_dir
    knn_val_dir: str = ""  # labeled folder; default: knn.val_dir
    knn_train_size: int = 5000  # images drawn from the train folder; 0: all
    knn_val_size: int = 2000  # images drawn from the val folder; 0: all
    knn_precision: str = "bf16"  # feature extraction: bf16 (fast) | fp32 | fp16 (CUDA) | auto (bf16 where faster)
    knn_seed: int = 0  # draws the subsets
    knn_layout: str = "cls"  # the features: cls | obj (ODIS's [OBJ] over every patch; runs with odis.weight > 0)

    @property
    def knn_on(self) -> bool:
        """Whether online k-NN is on (an interval is set)."""
        return self.knn_every_epochs > 0 or self.knn_every_steps > 0


@dataclass
class RunConfig:
    """Where and how a run executes."""

    output_dir: str = "runs/dino"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 (CPU and CUDA) | fp16 (CUDA, with GradScaler) | fp32 | auto (bf16 where faster)
    compile: str = "off"  # off | on (torch.compile of the transformer blocks) | auto (on where a block is faster so)
    threads: int = 0  # torch intra-op threads; 0: SLURM_CPUS_PER_TASK under SLURM, else torch's default
    log_every: int = 10  # iterations between JSON log lines
    checkpoint_every: int = 500  # iterations between checkpoints (and at every epoch end)
    keep_every_epochs: int = 0  # also keep checkpoint_epochNNNN.pth every N epochs; 0 keeps none
    stop_at_step: int | None = None  # stop (after a checkpoint) at this global step; resume later
    tensorboard: bool = False
    progress: bool = True
    collapse_window: int = 200  # iterations of near-uniform / near-one-hot teacher before a warning
    max_requeues: int = 20  # SLURM: requeues after a time limit / preemption signal before giving up
    dist_timeout_min: float = 30  # collectives fail after this long, so a dead rank cannot hang the job


@dataclass
class MaskingConfig:
    """Masks for masked image modeling, drawn with the batch (iBOT, Zhou et al. ICLR 2022, loader.py).

    ``shape``: ``none`` (no masks from the data: DINO), ``block`` (BEiT's block-wise masking, as iBOT
    by default) or ``random`` (exactly ``int(ratio * h * w)`` patches). Each global view of each image
    picks one entry of ``pred_ratio`` uniformly, then a ratio uniform in ``pred_ratio[i] +-
    pred_ratio_var[i]`` (a single ``pred_ratio_var`` applies to every entry, as in iBOT). Nothing is
    masked before epoch ``pred_start_epoch``. Local views are never masked.
    """

    shape: str = "none"  # none | block | random
    pred_ratio: tuple[float, ...] = (0.3,)
    pred_ratio_var: tuple[float, ...] = (0.0,)
    pred_aspect_ratio: tuple[float, float] = (0.3, 1.0 / 0.3)  # block height / width, log-uniform
    pred_start_epoch: float = 0
    min_block_patches: int | None = None  # smallest block target; None = iBOT's (min(h, w) // 3) ** 2
    max_block_patches: int | None = None  # largest block target (BEiT's max_num_patches); None = no cap, as iBOT
    # AttMask (Kakogeorgiou et al. ECCV 2022): masks from the teacher's last-block CLS attention instead
    # of the data; one ratio per batch from pred_ratio / pred_ratio_var, each view masked with masking_prob
    attmask: str = "none"  # none | high | low | hint
    masking_prob: float = 0.5


@dataclass
class Config:
    """A whole recipe: one YAML file in configs/ maps onto this."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoLossConfig = field(default_factory=DinoLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    odis: OdisConfig = field(default_factory=OdisConfig)
    gram: GramConfig = field(default_factory=GramConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _number(value: Any) -> int | float | None:
    """An int or float from a YAML value; strings are read as Python's ``int()`` / ``float()`` would.

    YAML 1.1 (PyYAML) reads ``1e-4`` and ``1e+4`` as strings (its floats need a dot), so a
    number in a recipe or an override may arrive as text. Booleans and other types are not numbers.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert a YAML value to the annotated type; error names the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):  # one value for a list of any length: [value]
                value = [value]
            return tuple(_coerce(v, args[0], key) for v in value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        number = _number(value)
        if number is None or (isinstance(number, float) and not number.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(number)
    if tp is str:
        if isinstance(value, bool) and key in ON_OFF_KEYS:  # YAML reads an unquoted on / off as true / false
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    raise ConfigError(f"{key}: unsupported type {tp}")


ON_OFF_KEYS = ("run.compile",)  # string settings whose values include on and off


def _unknown_key(key: str, known: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            raise _unknown_key(key, list(types_), prefix)
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested dicts; unknown keys raise ConfigError with a suggestion."""
    return _build(Config, data or {})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dicts (tuples become lists), suitable for YAML / JSON / checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.001' -> (['optim', 'lr'], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to nested dicts, checking each key against the schema."""
    data = copy.deepcopy(data or {})
    for text in overrides:
        path, value = parse_override(text)
        cls: Any = Config
        node = data
        for depth, part in enumerate(path):
            types_ = _field_types(cls)
            if part not in types_:
                raise _unknown_key(part, list(types_), "".join(p + "." for p in path[:depth]))
            if depth == len(path) - 1:
                node[part] = value
            else:
                cls = types_[part]
                if not dataclasses.is_dataclass(cls):
                    raise ConfigError(f"override {text!r}: '{'.'.join(path[:depth + 1])}' is not a section")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: '{'.'.join(path[:depth + 1])}' is not a section")
    return data


BASE_KEY = "base"  # a recipe's parent recipe: the file states only what differs from it


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: the safe loader keeps the
    last value, so a recipe that sets ``lr`` twice would train with one of them without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the safe loader reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {first + 1} and "
                    f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml_mapping(p: Path) -> dict[str, Any]:
    """The top-level mapping of one YAML file (an empty file is an empty mapping)."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    with open(p) as f:
        try:
            data = yaml.load(f, Loader=_RecipeLoader) or {}  # noqa: S506 (a safe loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def merge_recipe(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: sections (mappings) merge key by key, any other value of ``child`` replaces."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_recipe(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's settings with its ``base:`` chain resolved, as one nested mapping.

    ``base: other.yaml`` (a path relative to the recipe's folder) makes the recipe state only what differs
    from ``other.yaml``, which may name a base of its own; the recipe's values win and sections merge key by
    key. A missing base or a chain that comes back to a file it passed through is a ConfigError.
    """
    chain: list[Path] = []
    p = Path(path)
    layers: list[dict[str, Any]] = []
    while True:
        resolved = p.resolve()
        if resolved in chain:
            names = " -> ".join(str(c) for c in [*chain, resolved])
            raise ConfigError(f"{chain[0]}: the '{BASE_KEY}:' chain loops ({names})")
        chain.append(resolved)
        data = _read_yaml_mapping(p)
        base = data.pop(BASE_KEY, None)
        layers.append(data)
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{p}: '{BASE_KEY}:' must name one recipe file, got {base!r}")
        parent = p.parent / base
        if not parent.is_file():
            raise ConfigError(f"{p}: its {BASE_KEY} recipe {base!r} was not found (looked for {parent})")
        p = parent
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = merge_recipe(merged, layer)
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (its ``base:`` chain merged in; or start from defaults), apply overrides, validate
    strictly."""
    data = read_recipe(path) if path is not None else {}
    cfg = config_from_dict(apply_overrides(data, overrides or []))
    validate(cfg)
    return cfg


def gram_ckpt_path(cfg: Config) -> str | None:
    """The file or run directory the Gram teacher is loaded from: ``gram.ckpt``, with
    :data:`GRAM_CKPT_FROM_INIT` standing for ``model.init_from``'s file; None when it is loaded from none."""
    return cfg.model.init_from if cfg.gram.ckpt == GRAM_CKPT_FROM_INIT else cfg.gram.ckpt


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, hint: str = "") -> None:
    """Raise ConfigError naming ``key`` unless lo (<) <= value (<) <= hi; NaN is never in range."""
    ok = value == value
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        low = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        high = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{key}={value} is out of range: expected {low}{key.rsplit('.', 1)[-1]}{high}{hint}")


def _check_interval(key: str, pair: tuple[float, float], lo: float, hi: float | None) -> None:
    """A (low, high) pair inside (lo, hi] with low <= high."""
    for v in pair:
        _check_range(key, v, lo, hi, lo_open=True)
    if pair[0] > pair[1]:
        raise ConfigError(f"{key}={list(pair)}: the first value must not exceed the second")


def _check_masking(mk: MaskingConfig) -> None:
    """masking.*: a known shape, ratios and ratio +- var in [0, 1), var lists that fit the ratio list."""
    if mk.shape not in ("none", "block", "random"):
        raise ConfigError(f"masking.shape must be none, block or random, got {mk.shape!r}")
    if mk.attmask not in ("none", "high", "low", "hint"):
        raise ConfigError(f"masking.attmask must be none, high, low or hint, got {mk.attmask!r}")
    if mk.attmask != "none" and mk.shape != "none":
        raise ConfigError(f"masking.attmask={mk.attmask} builds the masks from the teacher's attention, and "
                          f"masking.shape={mk.shape} from the data: choose one (set masking.shape=none for AttMask)")
    _check_range("masking.masking_prob", mk.masking_prob, 0, 1)
    if mk.attmask != "none" and mk.masking_prob == 0:
        raise ConfigError(f"masking.masking_prob=0 masks no view, so the patch term of masking.attmask={mk.attmask} "
                          "would never train: give it a probability above 0 (0.5 in AttMask)")
    if mk.attmask == "none" and mk.masking_prob != MaskingConfig.masking_prob:
        raise ConfigError(f"masking.masking_prob={mk.masking_prob} applies to AttMask's masks only, and masking.attmask"
                          f"=none: remove it (block and random masks leave a view unmasked through a 0 entry in "
                          f"masking.pred_ratio, as iBOT), or set masking.attmask")
    why = "; a ratio is the fraction of a global view's patches to mask, and masking all of them leaves nothing to see"
    if not mk.pred_ratio:
        raise ConfigError("masking.pred_ratio is empty: give at least one ratio, e.g. [0.3]")
    if len(mk.pred_ratio_var) not in (1, len(mk.pred_ratio)):
        raise ConfigError(f"masking.pred_ratio_var has {len(mk.pred_ratio_var)} entries for {len(mk.pred_ratio)} "
                          "pred_ratio entries: give one per ratio, or a single one for all (as iBOT)")
    variances = mk.pred_ratio_var * len(mk.pred_ratio) if len(mk.pred_ratio_var) == 1 else mk.pred_ratio_var
    for i, (ratio, var) in enumerate(zip(mk.pred_ratio, variances)):
        _check_range(f"masking.pred_ratio[{i}]", ratio, 0, 1, hi_open=True, hint=why)
        _check_range(f"masking.pred_ratio_var[{i}]", var, 0)
        if ratio - var < 0 or ratio + var >= 1:
            raise ConfigError(
                f"masking.pred_ratio[{i}]={ratio} with pred_ratio_var={var} draws ratios in [{ratio - var:g}, "
                f"{ratio + var:g}], outside [0, 1): the variation must satisfy var <= ratio and ratio + var < 1")
    _check_interval("masking.pred_aspect_ratio", mk.pred_aspect_ratio, 0, None)
    _check_range("masking.pred_start_epoch", mk.pred_start_epoch, 0)
    for key in ("min_block_patches", "max_block_patches"):
        if getattr(mk, key) is not None:
            _check_range(f"masking.{key}", getattr(mk, key), 1)


def _check_model(m: ModelConfig) -> None:
    """model.pos_embed and the keys that belong to one kind of position encoding only."""
    if m.pos_embed not in ("learned", "rope"):
        raise ConfigError(f"model.pos_embed must be learned (DINO, iBOT, DINOv2) or rope (DINOv3), got {m.pos_embed!r}")
    if m.pos_embed == "rope":
        if m.no_embed_class or m.pos_interp != "timm":
            raise ConfigError("model.no_embed_class and model.pos_interp describe a learned position embedding, "
                              "which a model.pos_embed=rope backbone has not: leave them at false / timm")
        _check_range("model.rope_theta", m.rope_theta, 0, lo_open=True)
        if m.rope_rescale_coords is not None:
            _check_range("model.rope_rescale_coords", m.rope_rescale_coords, 1,
                         hint=" (coordinates are scaled by a factor in [1/R, R]; null turns it off)")
        if m.norm_eps is not None:
            _check_range("model.norm_eps", m.norm_eps, 0, lo_open=True)
        return
    defaults = ModelConfig()
    for key in ("rope_theta", "rope_rescale_coords", "norm_eps"):
        if getattr(m, key) != getattr(defaults, key):
            raise ConfigError(f"model.{key}={getattr(m, key)} applies to model.pos_embed=rope only; this model has "
                              "a learned position embedding (and timm's LayerNorm eps 1e-6)")


def _check_objectives(cfg: Config) -> None:
    """Weights, temperatures and centering of the objectives, and masks only where a masked term reads them."""
    d, p, mk = cfg.dino, cfg.ibot, cfg.masking
    weights = {"dino.weight": d.weight, "ibot.weight": p.weight, "odis.weight": cfg.odis.weight}
    for key, value in {**weights, "dino.koleo_weight": d.koleo_weight}.items():
        _check_range(key, value, 0)
    if not any(weights.values()):
        raise ConfigError("dino.weight, ibot.weight and odis.weight are all 0: nothing would be trained; set one "
                          "of them (dino.weight=1 for DINO)")
    _check_range("odis.center_momentum", cfg.odis.center_momentum, 0, 1)
    if cfg.odis.target_box not in ODIS_TARGET_BOX:
        raise ConfigError(f"odis.target_box must be sample (a box drawn first, as the authors) or largest (the "
                          f"largest box the first crop shows), got {cfg.odis.target_box!r}")
    if cfg.odis.no_box not in ODIS_NO_BOX:
        raise ConfigError(f"odis.no_box must be none (no object term for an image without a box) or whole_image "
                          f"([OBJ] on every patch of its plain views), got {cfg.odis.no_box!r}")
    if d.weight == 0 and cfg.odis.weight == 0 and not p.shared_head:
        raise ConfigError("dino.weight=0 and odis.weight=0 with a separate patch head (ibot.shared_head=false) leave "
                          "the [CLS] head with nothing to learn: share the head, or give dino.weight a value")
    if cfg.odis.weight > 0 and cfg.data.boxes is None:
        raise ConfigError("odis.weight > 0 distills objects, but data.boxes names no boxes file: set data.boxes "
                          "(a COCO-style file, e.g. the boxes.json that ssl-distill discover or make-scenes writes)")
    if cfg.odis.ablation not in ODIS_ABLATIONS:
        raise ConfigError(f"odis.ablation must be none, cropping_only (object-aware crops, no [OBJ] term) or "
                          f"masking_only (plain crops, [OBJ] on the target's box), got {cfg.odis.ablation!r}")
    if cfg.odis.ablation == "cropping_only" and (cfg.data.boxes is None or cfg.odis.weight > 0 or d.weight == 0):
        raise ConfigError("odis.ablation=cropping_only trains the [CLS] term on object-aware crops without [OBJ]: it "
                          "needs data.boxes, odis.weight=0 and dino.weight > 0")
    if cfg.odis.ablation == "masking_only" and cfg.odis.weight == 0:
        raise ConfigError("odis.ablation=masking_only trains [OBJ] on plain crops: set odis.weight > 0")
    if cfg.data.boxes is not None and cfg.odis.weight == 0 and cfg.odis.ablation != "cropping_only":
        raise ConfigError(f"data.boxes={cfg.data.boxes} makes object-aware crops for ODIS, but odis.weight=0 turns "
                          "its object term off: set odis.weight (1.0 in the ODIS recipes), or data.boxes=null")
    for key in ("teacher_temp", "warmup_teacher_temp"):
        _check_range(f"ibot.{key}", getattr(p, key), 0, lo_open=True)
    _check_range("ibot.center_momentum", p.center_momentum, 0, 1)
    _check_range("ibot.patch_out_dim", p.patch_out_dim, 1)
    for key, value in (("dino.centering", d.centering), ("ibot.centering", p.centering)):
        if value not in ("ema", "sinkhorn_knopp"):
            raise ConfigError(f"{key} must be ema (DINO, iBOT) or sinkhorn_knopp (DINOv2), got {value!r}")
    masked = mk.attmask != "none" or mk.shape != "none"
    if p.weight > 0 and not masked:
        raise ConfigError("ibot.weight > 0 trains on masked patches, but nothing masks them: set masking.shape "
                          "(block or random, as iBOT) or masking.attmask (high, low or hint, as AttMask)")
    if masked and p.weight == 0:
        what = f"masking.attmask={mk.attmask}" if mk.attmask != "none" else f"masking.shape={mk.shape}"
        raise ConfigError(f"{what} masks patches for a masked-image objective, but ibot.weight=0 turns that "
                          "objective off: set ibot.weight (1.0 in iBOT and AttMask), or masking to none for DINO")
    if mk.pred_start_epoch > 0 and not masked:
        raise ConfigError(f"masking.pred_start_epoch={mk.pred_start_epoch} delays the patch masks, but nothing masks "
                          "patches: remove it, or set masking.shape / masking.attmask with ibot.weight")
    # masks drawn with the batch know each sample's whole epoch only: they start at the first whole epoch
    start = mk.pred_start_epoch if mk.attmask != "none" else math.ceil(mk.pred_start_epoch)
    if masked and start >= cfg.optim.epochs:
        raise ConfigError(f"masking.pred_start_epoch={mk.pred_start_epoch} leaves no epoch of the run to mask "
                          f"(optim.epochs={cfg.optim.epochs}; masks from the data start at a whole epoch): the patch "
                          "term would never train; lower it (0 in iBOT), or train without it (ibot.weight=0, masking "
                          "none)")


def _check_gram(cfg: Config) -> None:
    """gram.* and data.crops.gram_*: a Gram teacher with one source, refresh keys that agree, a term with
    patches to compare, Gram crops only where a separate Gram teacher reads them."""
    g, c, m = cfg.gram, cfg.data.crops, cfg.model
    for key in ("weight", "dino_local_weight", "start_step", "ramp_steps", "update_frequency", "it_first_update"):
        _check_range(f"gram.{key}", getattr(g, key), 0)
    _check_range("gram.it_load_ema_teacher", g.it_load_ema_teacher, -1, hint=" (-1: never)")
    if g.max_updates is not None:
        _check_range("gram.max_updates", g.max_updates, 1, hint=" (null: no limit; no refresh at all: "
                     "gram.update_frequency=0)")
    if g.ckpt is not None and not g.ckpt.strip():
        raise ConfigError("gram.ckpt is an empty string: give a backbone file or run directory, or null for none")
    if g.ckpt == GRAM_CKPT_FROM_INIT and not m.init_from:
        raise ConfigError(f"gram.ckpt={GRAM_CKPT_FROM_INIT} takes the Gram teacher from the file the run starts "
                          "from, but model.init_from is null: set model.init_from=<backbone file> (e.g. a released "
                          "DINOv3 .pth), or give gram.ckpt a file of its own")
    if not g.on:
        used = [f"{k}={v}" for k, v in (("data.crops.gram_size", c.gram_size), ("gram.ckpt", g.ckpt)) if v is not None]
        used += [f"gram.{k}={str(getattr(g, k)).lower()}" for k, off in (
            ("ema_teacher", False), ("it_load_ema_teacher", -1), ("update_frequency", 0), ("dino_local_weight", 1.0))
            if getattr(g, k) != off]
        if used:
            raise ConfigError(f"{', '.join(used)} {'sets' if len(used) == 1 else 'set'} up Gram anchoring, but "
                              "gram.weight=0 turns its term off: set gram.weight (2.0 in DINOv3's Gram stage), or "
                              "leave those keys at their defaults")
        return
    if g.remove_neg and g.remove_only_teacher_neg:
        raise ConfigError("gram.remove_neg and gram.remove_only_teacher_neg are both true: they are two variants of "
                          "the negative-entry removal (both matrices, or the teacher's only); choose one")
    grid = c.global_size // m.patch_size
    if g.img_level and grid * grid < 2:
        raise ConfigError(f"gram.img_level=true compares the patches of each global view, but data.crops.global_size="
                          f"{c.global_size} at model.patch_size={m.patch_size} gives one patch: its Gram matrix is "
                          "always [[1]] and the term has nothing to read; use larger global crops")
    if g.dino_local_weight != 1.0 and (cfg.dino.weight == 0 or c.n_local == 0):
        raise ConfigError(f"gram.dino_local_weight={g.dino_local_weight} reweights the DINO term's local-crop pairs, "
                          f"but the run has none (dino.weight={cfg.dino.weight}, data.crops.n_local={c.n_local}): "
                          "leave it at 1")
    if c.gram_size is not None:
        _check_range("data.crops.gram_size", c.gram_size, 1)
        if c.gram_size % m.patch_size:
            raise ConfigError(f"data.crops.gram_size={c.gram_size} is not a multiple of model.patch_size="
                              f"{m.patch_size}: the Gram teacher's patch grid would drop the last pixels")
    sources = [key for key, on in (("gram.ema_teacher=true", g.ema_teacher),
                                   (f"gram.ckpt={g.ckpt}", g.ckpt is not None),
                                   (f"gram.it_load_ema_teacher={g.it_load_ema_teacher}", g.it_load_ema_teacher >= 0))
               if on]
    if not sources:
        raise ConfigError("gram.weight > 0 needs a Gram teacher: gram.ema_teacher=true (the live EMA teacher), "
                          "gram.ckpt=<backbone file> or gram.it_load_ema_teacher=<step> (a frozen copy of the EMA "
                          "teacher taken before that step)")
    if len(sources) > 1:
        raise ConfigError(f"{' and '.join(sources)} both say where the Gram teacher comes from: choose one "
                          "(gram.update_frequency refreshes a frozen one from the EMA teacher later)")
    if g.ema_teacher:
        if c.gram_size is not None:
            raise ConfigError(f"gram.ema_teacher=true compares with the EMA teacher's own patches of the global views, "
                              f"so data.crops.gram_size={c.gram_size} would render crops nobody reads: set it to null "
                              "(or use a frozen Gram teacher: gram.ckpt or gram.it_load_ema_teacher)")
        if g.update_frequency:
            raise ConfigError(f"gram.update_frequency={g.update_frequency} refreshes a frozen Gram teacher from the "
                              "EMA teacher, but gram.ema_teacher=true uses the EMA teacher itself: set "
                              "update_frequency=0")
    elif c.gram_size is None:
        raise ConfigError("a frozen Gram teacher reads its own crops of the global views: set data.crops.gram_size "
                          f"(e.g. {2 * c.global_size}, twice data.crops.global_size as DINOv3's Gram stage, or "
                          f"{c.global_size} for the same resolution)")
    if g.update_frequency == 0:
        extra = [f"gram.{k}={getattr(g, k)}" for k, off in (("it_first_update", 0), ("max_updates", None))
                 if getattr(g, k) != off]
        if extra:
            raise ConfigError(f"{', '.join(extra)} {'says' if len(extra) == 1 else 'say'} when Gram teacher refreshes "
                              "happen, but gram.update_frequency=0 never refreshes it: set update_frequency, or drop "
                              "those keys")
    if g.it_load_ema_teacher > g.start_step:
        raise ConfigError(f"gram.it_load_ema_teacher={g.it_load_ema_teacher} takes the Gram teacher after "
                          f"gram.start_step={g.start_step}, where the term already runs: take it at or before the "
                          "start step")


def _check_monitor(cfg: Config) -> None:
    """monitor.*: one interval at most, sizes >= 0, a known precision, labeled folders when it is on."""
    mo = cfg.monitor
    _check_range("monitor.knn_every_epochs", mo.knn_every_epochs, 0)
    for key in ("knn_every_steps", "knn_train_size", "knn_val_size"):
        _check_range(f"monitor.{key}", getattr(mo, key), 0)
    if mo.knn_every_epochs > 0 and mo.knn_every_steps > 0:
        raise ConfigError(f"monitor.knn_every_epochs={mo.knn_every_epochs} and monitor.knn_every_steps="
                          f"{mo.knn_every_steps} both set the online k-NN interval: set one, the other to 0")
    if mo.knn_layout not in ("cls", "obj"):
        raise ConfigError(f"monitor.knn_layout must be cls or obj, got {mo.knn_layout!r}")
    if mo.knn_layout == "obj" and cfg.odis.weight == 0:
        raise ConfigError("monitor.knn_layout=obj reads the [OBJ] token, which only ODIS runs have: set odis.weight "
                          "(with data.boxes), or monitor.knn_layout=cls")
    if mo.knn_precision not in ("fp32", "bf16", "fp16", "auto"):
        raise ConfigError(f"monitor.knn_precision must be fp32, bf16 or fp16, got {mo.knn_precision!r}")
    if mo.knn_on:
        for split in ("train", "val"):
            if not (getattr(mo, f"knn_{split}_dir") or getattr(cfg.knn, f"{split}_dir")):
                raise ConfigError(f"online k-NN (monitor.knn_every_*) needs a labeled {split} folder: set "
                                  f"monitor.knn_{split}_dir or knn.{split}_dir")


def _check_boxes(d: DataConfig) -> None:
    """data.boxes and the object-aware cropping keys."""
    if d.boxes is not None and not d.boxes.strip():
        raise ConfigError("data.boxes is an empty string: give the path of a COCO-style boxes file, or null for none")
    _check_range("data.crops.min_object_cover", d.crops.min_object_cover, 0, 1, lo_open=True,
                 hint=" (the fraction of a crop's area the object must cover)")
    _check_range("data.crops.min_object_inside", d.crops.min_object_inside, 0, 1,
                 hint=" (the share of the target box a global crop must hold; 0: no such rule)")
    if d.crops.object_aware_local and d.boxes is None:
        raise ConfigError("data.crops.object_aware_local=true draws local crops around boxes, but data.boxes is "
                          "null: set data.boxes to a COCO-style boxes file, or object_aware_local to false")
    if d.crops.object_aware_local and d.crops.n_local == 0:
        raise ConfigError("data.crops.object_aware_local=true draws the local crops around the target object, but "
                          "data.crops.n_local=0 makes no local crop: set n_local, or object_aware_local to false")


def validate(cfg: Config) -> None:
    """Value ranges and cross-field checks that types alone cannot express.

    Everything here is checked before a folder is scanned, a model built or a file written, so a
    wrong value costs nothing but its one-line message.
    """
    r, d, c, m, o, k = cfg.run, cfg.data, cfg.data.crops, cfg.model, cfg.optim, cfg.knn
    if r.precision not in ("bf16", "fp16", "fp32", "auto"):
        raise ConfigError(f"run.precision must be bf16, fp16, fp32 or auto, got {r.precision!r}")
    if r.compile not in ("off", "on", "auto"):
        raise ConfigError(f"run.compile must be off, on or auto, got {r.compile!r}")
    if r.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device must be auto, cpu or cuda, got {r.device!r}")
    positive = {
        "run.log_every": r.log_every, "run.checkpoint_every": r.checkpoint_every,
        "run.collapse_window": r.collapse_window, "data.batch_size": d.batch_size,
        "data.crops.n_global": c.n_global, "data.crops.global_size": c.global_size,
        "data.crops.local_size": c.local_size, "model.patch_size": m.patch_size, "model.img_size": m.img_size,
        "model.out_dim": m.out_dim, "model.hidden_dim": m.hidden_dim, "model.bottleneck_dim": m.bottleneck_dim,
        "model.head_layers": m.head_layers, "knn.image_size": k.image_size,
        "knn.resize_size": k.resize_size, "knn.batch_size": k.batch_size,
    }
    for key in ("depth", "embed_dim", "num_heads"):
        if getattr(m, key) is not None:
            positive[f"model.{key}"] = getattr(m, key)
    for key, value in positive.items():
        _check_range(key, value, 1)
    _check_range("optim.epochs", o.epochs, 0, lo_open=True)
    if r.stop_at_step is not None:
        _check_range("run.stop_at_step", r.stop_at_step, 1,
                     hint=" (null trains the whole run; the step count of a stopped run only grows)")
    for key, value in {"run.keep_every_epochs": r.keep_every_epochs, "run.threads": r.threads,
                       "run.max_requeues": r.max_requeues, "data.num_workers": d.num_workers,
                       "data.cache_mb": d.cache_mb, "data.crops.n_local": c.n_local, "model.reg_tokens": m.reg_tokens,
                       "knn.num_workers": k.num_workers}.items():
        _check_range(key, value, 0)
    _check_range("run.dist_timeout_min", r.dist_timeout_min, 0, lo_open=True)
    if c.n_global + c.n_local < 2:
        raise ConfigError(
            f"data.crops: n_global={c.n_global} and n_local={c.n_local} leave the loss no pair of different "
            "views (each teacher view is compared only with the student's other views); use n_global >= 2 "
            "or n_local >= 1")
    probabilities = {"data.max_bad_fraction": d.max_bad_fraction, "data.crops.flip_p": c.flip_p,
                     "data.crops.jitter_p": c.jitter_p, "data.crops.grayscale_p": c.grayscale_p,
                     "data.crops.solarize_p": c.solarize_p, "dino.center_momentum": cfg.dino.center_momentum,
                     "optim.momentum_teacher": o.momentum_teacher, "optim.momentum_teacher_end": o.momentum_teacher_end}
    probabilities.update({f"data.crops.blur_p[{i}]": p for i, p in enumerate(c.blur_p)})
    probabilities.update({f"optim.betas[{i}]": b for i, b in enumerate(o.betas)})
    for key, value in probabilities.items():
        _check_range(key, value, 0, 1)
    _check_range("model.drop_path_rate", m.drop_path_rate, 0, 1, hi_open=True)
    _check_range("model.mlp_ratio", m.mlp_ratio, 0, lo_open=True)
    _check_interval("data.crops.global_scale", c.global_scale, 0, 1)
    _check_interval("data.crops.local_scale", c.local_scale, 0, 1)
    _check_interval("data.crops.ratio", c.ratio, 0, None)
    _check_interval("data.crops.blur_sigma", c.blur_sigma, 0, None)
    for i, v in enumerate(c.std):
        _check_range(f"data.crops.std[{i}]", v, 0, lo_open=True)
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _check_range(f"dino.{key}", getattr(cfg.dino, key), 0, lo_open=True)
    _check_range("dino.warmup_teacher_temp_epochs", cfg.dino.warmup_teacher_temp_epochs, 0)
    for key in ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "freeze_last_layer",
                "freeze_backbone_steps"):
        _check_range(f"optim.{key}", getattr(o, key), 0)
    if o.freeze_backbone_steps and not m.init_from:
        raise ConfigError(f"optim.freeze_backbone_steps={o.freeze_backbone_steps} holds the backbone still while "
                          "fresh heads learn on its features, but model.init_from is null: a random backbone has "
                          "no features to keep; set model.init_from=<backbone file>, or freeze_backbone_steps=0")
    if not k.ks:
        raise ConfigError("knn.ks is empty: give at least one number of neighbours, e.g. [20]")
    for v in k.ks:
        _check_range("knn.ks", v, 1)
    _check_range("knn.temperature", k.temperature, 0, lo_open=True)
    for name, size in (("global_size", c.global_size), ("local_size", c.local_size)):
        if size % m.patch_size:
            raise ConfigError(f"data.crops.{name}={size} is not a multiple of model.patch_size={m.patch_size}")
    _check_model(m)
    _check_boxes(d)
    _check_masking(cfg.masking)
    _check_objectives(cfg)
    _check_gram(cfg)
    _check_monitor(cfg)


def config_notes(cfg: Config) -> list[str]:
    """Settings that are valid but probably not what was meant, one sentence each (``train`` prints them)."""
    c = cfg.data.crops
    notes = []
    if c.n_local and c.local_size > c.global_size:
        notes.append(f"data.crops.local_size={c.local_size} is larger than global_size={c.global_size}: the local "
                     "views (small crops of the image) are usually the smaller ones (DINO: 96 and 224)")
    return notes


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def config_changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two nested dicts: ``{key: (a's value, b's value)}``, sorted."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(config_changes(va, vb, prefix + k + "."))
        elif va != vb:
            out[prefix + k] = (va, vb)
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as ``key: a -> b`` lines."""
    return [f"{k}: {va!r} -> {vb!r}" for k, (va, vb) in config_changes(a, b, prefix).items()]
