"""Configs: presets, validated overrides and the clear errors a bad config gets."""

import pytest

from dalle_ds.config import PRESETS, ConfigError, apply_overrides, check_compatible, from_dict, get_preset, load_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip(name):
    """Every preset is consistent and survives the dict round trip a checkpoint makes."""
    cfg = get_preset(name).validate()
    assert from_dict(cfg.to_dict()) == cfg


def test_12b_preset_is_the_paper():
    """64 layers x 62 heads x 64 = d 3968; text 256 of 16384; image 32x32 of 8192."""
    p = get_preset("12b").prior
    assert (p.n_layers, p.n_heads, p.head_dim, p.d_model) == (64, 62, 64, 3968)
    assert (p.text_len, p.text_vocab_size, p.image_grid, p.image_vocab_size) == (256, 16384, 32, 8192)
    assert get_preset("12b").dvae.grid_size == 32


def test_overrides_are_typed():
    """String overrides are converted to the field's type, fractions and tuples included."""
    cfg = load_config(
        "tiny",
        overrides=[
            "prior.d_model=64",
            "prior.text_loss_weight=1/8",
            "prior_train.betas=0.9,0.95",
            "tokenizer.lowercase=false",
        ],
    )
    assert cfg.prior.d_model == 64 and cfg.prior.text_loss_weight == 0.125
    assert cfg.prior_train.betas == (0.9, 0.95) and cfg.tokenizer.lowercase is False


def test_yaml_overrides(tmp_path):
    """A nested YAML mapping is applied and validated like command-line overrides."""
    f = tmp_path / "c.yaml"
    f.write_text("prior:\n  n_layers: 3\nprior_train:\n  steps: 7\n")
    cfg = load_config("tiny", f)
    assert cfg.prior.n_layers == 3 and cfg.prior_train.steps == 7
    f.write_text("prior:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"prior\.n_layer: unknown field \(did you mean prior\.n_layers\?\)"):
        load_config("tiny", f)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("prior.d_modl=3", r"prior\.d_modl: unknown field \(did you mean prior\.d_model\?\)"),
        ("priro.d_model=3", r"priro: unknown field \(did you mean prior\?\)"),
        ("prior.d_model=abc", r"prior\.d_model: expected an integer"),
        ("prior.d_model=2.5", r"prior\.d_model: expected an integer"),
        ("tokenizer.lowercase=maybe", r"tokenizer\.lowercase: expected true or false"),
        ("d_model=3", r"d_model: overrides are written section\.field=value"),
    ],
)
def test_bad_override_names_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", overrides=[override])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["dvae.image_size=18", "data.image_size=18"], "dvae.image_size"),  # 18 % 4 != 0
        (["prior.n_heads=3"], "prior.n_heads"),  # 3 does not divide 32
        (["prior.image_grid=8"], "prior.image_grid"),  # dVAE gives 4x4
        (["prior.image_vocab_size=64"], "prior.image_vocab_size"),  # dVAE codebook is 32
        (["prior.text_len=20"], "prior.text_len"),  # tokenizer has 12 slots
        (["prior.conv_kernel=4"], "prior.conv_kernel"),  # even window
        (["prior.attention_backend=flash"], "prior.attention_backend"),
        (["data.image_size=32"], "data.image_size"),
        (["sample.top_p=0"], "sample.top_p"),
        (["dvae_train.mse_warmup=-1"], "dvae_train.mse_warmup"),
        (["dvae_train.mse_warmup=5"], "dvae_train.mse_warmup_steps"),  # fades over 0 steps
        (["clip.augment=1.5"], "clip.augment"),  # a zoom past the whole picture
    ],
)
def test_inconsistent_combinations_are_refused(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=overrides)
    assert str(e.value).startswith(field + ":")


def test_checkpoint_with_other_vocabulary_or_grid_is_refused():
    """Loading weights into a config with another vocabulary or grid names the differing field."""
    saved = get_preset("tiny")
    other = apply_overrides(get_preset("tiny"), ["prior.image_vocab_size=64", "dvae.vocab_size=64"])
    with pytest.raises(ConfigError, match=r"prior\.image_vocab_size: the checkpoint was trained with 32"):
        check_compatible(saved, other, "prior")
    other = apply_overrides(get_preset("tiny"), ["dvae.n_groups=2"])
    with pytest.raises(ConfigError, match=r"dvae\.n_groups"):
        check_compatible(saved, other, "dvae")
    backend_only = apply_overrides(get_preset("tiny"), ["prior.attention_backend=sparse"])
    check_compatible(saved, backend_only, "prior")  # weights do not depend on the backend


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset: unknown preset 'huge'"):
        get_preset("huge")
