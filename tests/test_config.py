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
