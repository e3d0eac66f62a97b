"""What a config builds for training: the student / teacher networks, with what its objectives read,
and the backbone weights a run starts from (``model.init_from``, ``gram.ckpt``).

The objectives themselves come from :func:`ssl_distill.objectives.build_objectives`; each declares
the outputs it reads (:class:`~ssl_distill.objectives.Reads`), and the networks get exactly the
parts those need.
"""
from __future__ import annotations

from ..checkpoints import CheckpointError, LoadedBackbone, load_any_backbone, load_state_strict
from ..config import Config
from ..models import DINOHead, MultiCropModel, ObjAttention, TokenBackbone, build_backbone, spec_from_config
from ..objectives import Reads, build_objectives


def _head(cfg: Config, in_dim: int, out_dim: int) -> DINOHead:
    m = cfg.model
    return DINOHead(in_dim, out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim, nlayers=m.head_layers,
                    use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer)


def build_model(cfg: Config, drop_path: float, rope_rescale_coords: float | None = None) -> MultiCropModel:
    """Backbone + DINO head, and what the config's objectives read besides: the mask token and,
    unless shared, a separate patch head for a term on masked patches (iBOT); the [OBJ] token, through
    the CLS head, for an object term (ODIS). ``drop_path`` and ``rope_rescale_coords`` (a RoPE
    backbone's coordinate augmentation) are the student's; the teacher has neither."""
    reads = Reads.union(objective.reads for objective in build_objectives(cfg))
    backbone = build_backbone(spec_from_config(cfg, drop_path, rope_rescale_coords), mask_token=reads.patch_masks,
                              obj_token=reads.object_masks, obj_attention=ObjAttention.from_config(cfg))
    head = _head(cfg, backbone.embed_dim, cfg.model.out_dim)
    separate = reads.patch_masks and not cfg.ibot.shared_head
    patch_head = _head(cfg, backbone.embed_dim, cfg.ibot.patch_out_dim) if separate else None
    return MultiCropModel(backbone, head, patch_head)


def load_backbone_weights(backbone: TokenBackbone, path: str, what: str) -> tuple[LoadedBackbone, str | None]:
    """Load the backbone of ``path`` (a file or run directory :func:`~ssl_distill.checkpoints.load_any_backbone`
    reads: ours, official DINO / iBOT / DINOv2) into ``backbone``, strictly.

    The file's mask token is kept only where ``backbone`` has one (iBOT's ``masked_embed`` keeps its own
    start otherwise); an [OBJ] token the file lacks starts as its [CLS]; its position embedding is
    resampled to ``backbone``'s stored grid when the file was trained at another size. Returns what was
    read and the resampling sentence (None when nothing was resampled). A backbone of another
    architecture raises CheckpointError naming the keys that do not fit (``what`` starts the sentence); a
    file that cannot be read (missing, not a checkpoint) names the setting that gave it (``what``'s key).
    """
    try:
        loaded = load_any_backbone(path, obj_token=backbone.has_obj_token)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (given by {what.split('=', 1)[0]})") from e
    state = loaded.backbone.state_dict()
    ours = backbone.state_dict()
    if "masked_embed" in ours and "masked_embed" not in state:
        state["masked_embed"] = ours["masked_embed"] if loaded.mask_token is None else loaded.mask_token
    if "masked_embed" not in ours:
        state.pop("masked_embed", None)
    resampled = backbone.fit_pos_embed(state)  # a file trained at another image size
    load_state_strict(backbone, state, f"{what} ({loaded.format} backbone)")
    return loaded, resampled
