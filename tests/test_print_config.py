"""Issue 16 item 1 (part): `dalle-ds <cmd> --preset P --print-config` prints the resolved config and exits 0."""

import importlib

import pytest
import yaml

from dalle_ds.config import load_config, to_dict

# every command that takes --preset (cli/common.py add_config_args)
COMMANDS = ["train_dvae", "train_prior", "train_clip", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_print_config_parses_and_matches_overrides(command, capsys, tmp_path):
    """The YAML parses, shows the --set overrides on top of the preset, needs none of the command's required
    arguments (--out, --data), and read back with --config gives the same config."""
    main = importlib.import_module(f"dalle_ds.cli.{command}").main
    sets = ["--set", "dvae.n_hid=12", "--set", "data.min_caption_words=1", "--set", "dvae_train.betas=0.8,0.9"]
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", *sets, "--print-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed["dvae"]["n_hid"] == 12 and printed["data"]["min_caption_words"] == 1
    assert printed["dvae_train"]["betas"] == [0.8, 0.9]
    want = to_dict(
        load_config("tiny", overrides=["dvae.n_hid=12", "data.min_caption_words=1", "dvae_train.betas=0.8,0.9"])
    )
    assert printed["prior"] == want["prior"] and printed["tokenizer"] == want["tokenizer"]  # the rest is the preset's
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert to_dict(load_config("shapes", yaml_path=path)) == want  # the printout is a complete config
