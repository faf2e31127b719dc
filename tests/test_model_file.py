"""dvae.pt, prior.pt and clip.pt load through torch's allowlisting unpickler: a crafted pickle is refused with
one line and its payload never runs; a file of the wrong kind, a folder, text or a truncated file is one line."""

import pickle
import subprocess
import sys

import pytest
import torch

from dalle_ds.config import load_config
from dalle_ds.dvae.io import load_dvae, save_dvae
from dalle_ds.dvae.model import DVAE
from dalle_ds.errors import ConfigError
from dalle_ds.prior.io import load_prior, save_prior
from dalle_ds.prior.model import Prior
from dalle_ds.rerank.contrastive import ContrastiveModel
from dalle_ds.rerank.io import load_clip, save_clip
from dalle_ds.safe_load import UnsafeFileError
from dalle_ds.tokenizer import CaptionTokenizer
from dalle_ds.training.export import export_run

LOADERS = {"dvae": load_dvae, "prior": load_prior, "clip": load_clip}


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears if, and only if, the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A real dvae.pt, prior.pt and clip.pt of the tiny preset (untrained weights: loading is what is tested)."""
    root = tmp_path_factory.mktemp("models")
    cfg = load_config("tiny")
    tok = CaptionTokenizer.train(["a red square at the top", "a blue circle at the left"] * 4, cfg.tokenizer)
    torch.manual_seed(0)
    save_dvae(root / "dvae.pt", DVAE(cfg.dvae).state_dict(), cfg, step=1)
    save_prior(root / "prior.pt", Prior(cfg.prior).state_dict(), cfg, tok, step=1)
    clip = ContrastiveModel(cfg.clip, tok.vocab_size, tok.text_len)
    save_clip(root / "clip.pt", clip.state_dict(), cfg, tok, step=1)
    return root


def _crafted(models, kind, path, marker):
    """A copy of a real model file with one extra entry that runs code when unpickled."""
    payload = torch.load(models / f"{kind}.pt", weights_only=True)
    payload["extra"] = Payload(marker)
    torch.save(payload, path)
    return path


def test_real_model_files_load_with_their_weights(models):
    """The three files hold only tensors and plain data: they load, weights equal to what was saved."""
    saved = torch.load(models / "prior.pt", weights_only=True)["state_dict"]
    prior, _, _ = load_prior(models / "prior.pt")
    assert all(torch.equal(prior.state_dict()[k], v) for k, v in saved.items())
    load_dvae(models / "dvae.pt")
    load_clip(models / "clip.pt")


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_crafted_pickle_is_refused_and_its_payload_never_runs(models, tmp_path, kind):
    """Each loader refuses a crafted file in one line naming it; the same file loaded the old way
    (weights_only=False) does run the payload, so the marker proves the refusal."""
    evil = _crafted(models, kind, tmp_path / f"{kind}.pt", tmp_path / "ran")
    with pytest.raises(UnsafeFileError) as e:
        LOADERS[kind](evil)
    msg = str(e.value)
    assert "\n" not in msg and str(evil) in msg and "could run code" in msg and "io.open" in msg
    assert not (tmp_path / "ran").exists()
    torch.load(evil, weights_only=False)  # the control: the payload is live
    assert (tmp_path / "ran").exists()


def test_crafted_plain_pickle_is_refused(models, tmp_path):
    """A bare pickle (not torch's zip format) with a payload: refused, not run."""
    evil = tmp_path / "prior.pt"
    evil.write_bytes(pickle.dumps({"kind": "prior", "x": Payload(tmp_path / "ran")}))
    with pytest.raises(UnsafeFileError, match="could run code"):
        load_prior(evil)
    assert not (tmp_path / "ran").exists()


def test_export_ema_refuses_a_crafted_prior_pt(models, tmp_path):
    """`dalle-ds export --ema` reads the run's prior.pt: a crafted one is refused, the payload does not run."""
    run = tmp_path / "run"
    run.mkdir()
    _crafted(models, "prior", run / "prior.pt", tmp_path / "ran")
    with pytest.raises(UnsafeFileError, match="could run code"):
        export_run(run, tmp_path / "out", ema=True)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def _bad_files(models, tmp_path):
    """(name, path, what the one-line error must say) for each wrong file given as a prior.pt."""
    data = (models / "prior.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "folder").mkdir()
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"kind": "prior", "config": {}}, tmp_path / "noweights.pt")
    return [
        ("dvae as prior", models / "dvae.pt", "a dvae.pt, expected a prior.pt"),
        ("clip as prior", models / "clip.pt", "a clip.pt, expected a prior.pt"),
        ("truncated", tmp_path / "truncated.pt", "truncated or damaged"),
        ("empty", tmp_path / "empty.pt", "truncated or damaged"),
        ("text", tmp_path / "text.pt", "not a PyTorch file"),
        ("folder", tmp_path / "folder", "it is a directory"),
        ("missing", tmp_path / "nope.pt", "no such file"),
        ("a list", tmp_path / "list.pt", "not a dalle_ds model file"),
        ("no weights", tmp_path / "noweights.pt", "without its config or weights"),
    ]


def test_wrong_files_as_prior_are_one_line_errors(models, tmp_path):
    """Every wrong file is a ConfigError (the CLI prints it as one line, exit 2) naming the file."""
    for name, path, says in _bad_files(models, tmp_path):
        with pytest.raises(ConfigError) as e:
            load_prior(path)
        assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), name


def test_prior_pt_as_dvae_is_refused(models):
    with pytest.raises(ConfigError, match="a prior.pt, expected a dvae.pt"):
        load_dvae(models / "prior.pt")


def test_sample_command_refuses_a_crafted_prior_in_one_line(models, tmp_path):
    """End to end: `dalle-ds sample --prior crafted.pt` exits 2 with one line and no traceback; no payload ran."""
    evil = _crafted(models, "prior", tmp_path / "prior.pt", tmp_path / "ran")
    cmd = [sys.executable, "-m", "dalle_ds.cli", "sample", "--prior", str(evil), "--dvae", str(models / "dvae.pt")]
    proc = subprocess.run(
        cmd + ["--caption", "a red square", "--out", str(tmp_path / "g.png")], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("dalle-ds sample:")]
    assert len(lines) == 1 and "could run code" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists()
