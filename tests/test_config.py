import pytest

from ssl_distill.config import ConfigError, config_diff, config_to_dict, load_config, save_config

CONFIGS = ["configs/dino_vit_small16.yaml", "configs/dino_vit_base16.yaml", "configs/dino_tiny_fmnist.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_recipes_load(path):
    cfg = load_config(path)
    assert cfg.data.crops.n_global == 2


def test_small16_has_the_papers_defaults():
    cfg = load_config("configs/dino_vit_small16.yaml")
    c = cfg.data.crops
    assert (c.global_size, c.global_scale, c.local_size, c.local_scale) == (224, (0.4, 1.0), 96, (0.05, 0.4))
    assert (c.flip_p, c.jitter, c.jitter_p, c.grayscale_p, c.blur_p, c.solarize_p) == (
        0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, (1.0, 0.1, 0.5), 0.2)
    assert cfg.dino.student_temp == 0.1 and cfg.dino.center_momentum == 0.9
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.weight_decay_end, o.clip_grad, o.momentum_teacher) == (0.0005, 0.04, 0.4, 3.0, 0.996)
    assert cfg.model.out_dim == 65536 and cfg.model.hidden_dim == 2048 and cfg.model.bottleneck_dim == 256


def test_overrides_are_typed():
    cfg = load_config("configs/dino_tiny_fmnist.yaml", ["optim.lr=0.002", "data.crops.local_scale=[0.1,0.3]",
                                                        "model.depth=2", "run.stop_at_step=null"])
    assert cfg.optim.lr == 0.002 and cfg.data.crops.local_scale == (0.1, 0.3) and cfg.model.depth == 2
    assert cfg.run.stop_at_step is None


@pytest.mark.parametrize("override, expect", [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("data.crop.n_local=2", "did you mean 'data.crops'"),
    ("model.patchsize=8", "did you mean 'model.patch_size'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.crops.global_scale=[1]", "expected 2 values"),
    ("optim", "key.sub=value"),
    ("data.cache_mb=-1", "data.cache_mb"),
])
def test_bad_overrides_say_what_is_wrong(override, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace("[", r"\[")):
        load_config("configs/dino_tiny_fmnist.yaml", [override])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  weight_decay_ned: 0.4\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay_end'"):
        load_config(p)


def test_crop_size_must_fit_patch():
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        load_config("configs/dino_vit_small16.yaml", ["data.crops.local_size=90"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/dino_vit_small16.yaml", ["optim.lr=0.1"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_diff(config_to_dict(cfg), config_to_dict(again)) == []


def test_base_key_states_only_the_difference(tmp_path):
    """A recipe with ``base:`` gets its base's values, its own win, and sections merge key by key."""
    (tmp_path / "parent.yaml").write_text("run: {seed: 3, log_every: 7}\noptim: {lr: 0.001, epochs: 5}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim: {epochs: 2}\ndino: {weight: 0.5}\n")
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\nrun: {seed: 4}\n")
    cfg = load_config(tmp_path / "grandchild.yaml")
    assert (cfg.run.seed, cfg.run.log_every) == (4, 7)
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.001, 2)
    assert cfg.dino.weight == 0.5
    # overrides still go on top; the saved config is the whole resolved one, without 'base'
    cfg = load_config(tmp_path / "child.yaml", ["optim.epochs=9"])
    assert cfg.optim.epochs == 9
    save_config(cfg, tmp_path / "saved.yaml")
    text = (tmp_path / "saved.yaml").read_text()
    assert "base" not in text and "lr: 0.001" in text and load_config(tmp_path / "saved.yaml") == cfg


def test_base_chain_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: its base recipe 'missing\.yaml' was not found"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="chain loops"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="must name one recipe file"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="a.yaml: its base recipe"):  # the failing link is named
        load_config(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("base: c2.yaml\noptim: {epochz: 1}\n")
    (tmp_path / "c2.yaml").write_text("optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.epochs'"):
        load_config(tmp_path / "f.yaml")


def test_recipes_with_a_base_resolve_to_whole_recipes():
    """The derived recipes keep their base's settings (spot checks against the papers' values)."""
    ibot = load_config("configs/ibot_tiny_fmnist.yaml")
    dino = load_config("configs/dino_tiny_fmnist.yaml")
    assert ibot.data == dino.data and ibot.model == dino.model and ibot.optim == dino.optim
    assert ibot.masking.shape == "block" and ibot.ibot.weight == 1.0 and not ibot.monitor.knn_on
    hint = load_config("configs/attmask_hint_vit_small16.yaml")
    assert (hint.masking.attmask, hint.masking.shape, hint.data.batch_size, hint.optim.epochs) == ("hint", "none", 60, 100)
    assert hint.model.out_dim == 8192 and hint.dino.warmup_teacher_temp_epochs == 30  # iBOT's, through AttMask-High
