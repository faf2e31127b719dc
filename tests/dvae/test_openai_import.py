"""Importing OpenAI's released dVAE (dalle_ds/dvae/openai.py, `dalle-ds import-dvae`).

The reference is the official `dall-e` package (0.1, installed with --no-deps by the Makefile, with `attrs`,
which its classes need). Random-init official modules are torch.save'd whole, as OpenAI released theirs,
read back through our restricted unpickler and compared with the official forward passes.
"""

import builtins
import contextlib
import io
import os
import pickle
import sys
import types

import pytest
import torch

from dalle_ds.config import DVAEConfig, get_preset
from dalle_ds.dvae import DVAE, map_pixels, unmap_pixels
from dalle_ds.dvae.io import load_dvae
from dalle_ds.dvae.openai import (
    OPENAI_DECODER_PARAMS,
    OPENAI_ENCODER_PARAMS,
    OpenAIImportError,
    dvae_from_openai_state_dicts,
    infer_openai_config,
    is_paper_config,
    load_openai_dvae,
    openai_experiment_config,
    read_openai_state_dict,
)


def _import_dall_e():
    """`dall_e/__init__.py` imports `requests` for its URL loader, which these tests never call and which the
    test env does not install: a stand-in is put in sys.modules for the import only."""
    with contextlib.ExitStack() as stack:
        try:
            import requests  # noqa: F401
        except ImportError:
            stack.callback(sys.modules.pop, "requests", None)
            sys.modules["requests"] = types.ModuleType("requests")
        import dall_e
        import dall_e.utils
    return dall_e


dall_e = _import_dall_e()

# the smallest config the official validators accept (n_hid >= 64, vocab_size >= 512, n_init >= 8); the
# official modules always have 4 groups, so 32 px gives a 4x4 grid
SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)
SMALL_INIT = 8
SIZE = 32


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Random-init official modules (non-zero biases so every parameter matters), saved whole as released."""
    torch.manual_seed(0)
    enc = dall_e.Encoder(**SMALL)
    dec = dall_e.Decoder(n_init=SMALL_INIT, **SMALL)
    with torch.no_grad():
        for m in (*enc.modules(), *dec.modules()):
            if isinstance(m, dall_e.utils.Conv2d):
                m.b.normal_(std=0.1)
    folder = tmp_path_factory.mktemp("openai")
    torch.save(enc, folder / "encoder.pkl")
    # openai/DALL-E#54: the released decoder.pkl predates nn.Upsample.recompute_scale_factor, so unpickled
    # whole on torch >= 1.11 its forward fails. Modules built here on new torch have the attribute and run
    # fine; it is removed for the save only, so the file looks like the released one, then put back for the
    # official forward below. Our importer reads state dicts only and never runs the pickled Upsample.
    ups = [m for m in dec.modules() if isinstance(m, torch.nn.Upsample)]
    assert len(ups) == 3
    for m in ups:
        del m.recompute_scale_factor
    torch.save(dec, folder / "decoder.pkl")
    for m in ups:
        m.recompute_scale_factor = None
    return enc.eval(), dec.eval(), folder


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_official_full_size_matches_paper_config_key_for_key():
    """The released architecture (dall_e defaults) against ours for DVAEConfig(): same keys in the same
    order, same shapes, 53,786,240 + 43,829,766 parameters; the inferred config is the paper's."""
    meta = torch.device("meta")
    enc_sd = dall_e.Encoder(device=meta).state_dict()
    dec_sd = dall_e.Decoder(device=meta).state_dict()
    with meta:
        ours = DVAE(DVAEConfig())
    for part, theirs in (("encoder", enc_sd), ("decoder", dec_sd)):
        mine = getattr(ours, part).state_dict()
        assert list(mine) == list(theirs)
        assert all(mine[k].shape == theirs[k].shape for k in mine)
    assert sum(t.numel() for t in enc_sd.values()) == OPENAI_ENCODER_PARAMS == 53_786_240
    assert sum(t.numel() for t in dec_sd.values()) == OPENAI_DECODER_PARAMS == 43_829_766
    assert sum(p.numel() for p in ours.encoder.parameters()) == OPENAI_ENCODER_PARAMS
    assert sum(p.numel() for p in ours.decoder.parameters()) == OPENAI_DECODER_PARAMS
    cfg = infer_openai_config(enc_sd, dec_sd)
    assert cfg == DVAEConfig() and is_paper_config(cfg)
    assert openai_experiment_config(cfg).to_dict() == get_preset("12b").to_dict()  # released: nothing changes
    assert dec_sd["blocks.output.conv.w"].shape[0] == 6  # logit-Laplace mu and ln b for 3 channels


def test_pickled_official_modules_give_the_same_logits_tokens_and_outputs(official):
    enc, dec, folder = official
    ours = load_openai_dvae(folder / "encoder.pkl", folder / "decoder.pkl", image_size=SIZE)
    assert ours.cfg == DVAEConfig(image_size=SIZE, n_groups=4, n_init=SMALL_INIT, **SMALL)
    pixels = _pixels()
    x = dall_e.map_pixels(pixels)
    assert torch.equal(x, map_pixels(pixels))  # eps 0.1 on both sides
    with torch.no_grad():
        logits_theirs = enc(x)  # (2, 512, 4, 4)
        logits_ours = ours.encoder(x)
        torch.testing.assert_close(logits_ours, logits_theirs, rtol=0, atol=1e-5)
        tokens = logits_theirs.argmax(dim=1)
        assert torch.equal(logits_ours.argmax(dim=1), tokens)
        assert torch.equal(ours.encode(pixels), tokens)

        # decoder: the official recipe (one-hot codes, sigmoid of the first 3 maps, unmap) and relaxed codes
        z = torch.nn.functional.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
        out_theirs = dec(z)
        assert out_theirs.shape == (2, 6, SIZE, SIZE)
        torch.testing.assert_close(ours.decoder(z), out_theirs, rtol=0, atol=1e-5)
        soft = torch.softmax(logits_theirs, dim=1)
        torch.testing.assert_close(ours.decoder(soft), dec(soft), rtol=0, atol=1e-5)
        recon_theirs = dall_e.unmap_pixels(torch.sigmoid(out_theirs[:, :3]))
        torch.testing.assert_close(ours.decode(tokens), recon_theirs, rtol=0, atol=1e-5)
        assert torch.equal(unmap_pixels(x), dall_e.unmap_pixels(x))


def test_legacy_format_and_state_dict_files_read_the_same(official, tmp_path):
    enc, dec, folder = official
    reference = read_openai_state_dict(folder / "encoder.pkl", "encoder")
    assert list(reference) == list(enc.state_dict())
    torch.save(enc, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    torch.save(enc.state_dict(), tmp_path / "state.pt")
    for name in ("legacy.pkl", "state.pt"):
        got = read_openai_state_dict(tmp_path / name, "encoder")
        assert list(got) == list(reference)
        assert all(torch.equal(got[k], reference[k]) for k in got)
    torch.save(dec.state_dict(), tmp_path / "dec_state.pt")
    a = load_openai_dvae(tmp_path / "state.pt", tmp_path / "dec_state.pt", image_size=SIZE)
    b = load_openai_dvae(folder / "encoder.pkl", folder / "decoder.pkl", image_size=SIZE)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_cli_writes_a_dvae_pt_that_loads_like_a_trained_one(official, tmp_path, capsys):
    from dalle_ds.cli.import_dvae import main

    enc, dec, folder = official
    out = tmp_path / "run" / "dvae.pt"
    main(
        [
            "--openai",
            str(folder / "encoder.pkl"),
            str(folder / "decoder.pkl"),
            "--out",
            str(out),
            "--image-size",
            str(SIZE),
        ]
    )
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and str(out) in line and "not the paper config" in line
    payload = torch.load(out, map_location="cpu", weights_only=False)
    assert payload["kind"] == "dvae" and payload["step"] == 0
    model, cfg = load_dvae(out)
    assert cfg.dvae == model.cfg and cfg.prior.image_grid == SIZE // 8 and cfg.prior.image_vocab_size == 512
    pixels = _pixels(1)
    with torch.no_grad():
        assert torch.equal(model.encode(pixels), enc(dall_e.map_pixels(pixels)).argmax(dim=1))


class _Hostile:
    """Unpickling this calls `fn(*args)`: the classic pickle exploit."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("container", ["raw pickle", "torch.save", "inside a module"])
def test_hostile_pickle_is_refused_without_running(official, tmp_path, how, container):
    enc, _, _ = official
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Hostile(os.system, f"touch {marker}")
    else:
        payload = _Hostile(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "encoder.pkl"
    if container == "raw pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    elif container == "torch.save":
        torch.save(payload, path)
    else:  # a real-looking encoder.pkl with one poisoned attribute deep inside
        buf = io.BytesIO()
        enc.blocks.group_1.evil = payload
        try:
            torch.save(enc, buf)
        finally:
            del enc.blocks.group_1.evil
        path.write_bytes(buf.getvalue())
    with pytest.raises(OpenAIImportError) as err:
        read_openai_state_dict(path, "encoder")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "refusing to unpickle the global" in msg
    assert ("system" in msg) if how == "os.system" else ("exec" in msg)  # protocol 2 says __builtin__.exec
    assert not marker.exists()


def test_wrong_shape_missing_key_and_swapped_files_are_named(official, tmp_path):
    enc, dec, folder = official
    enc_sd = {k: v.clone() for k, v in enc.state_dict().items()}
    dec_sd = {k: v.clone() for k, v in dec.state_dict().items()}
    bad = dict(enc_sd)
    bad["blocks.group_2.block_1.res_path.conv_2.w"] = torch.zeros(32, 32, 1, 1)
    torch.save(bad, tmp_path / "bad.pt")
    torch.save(dec_sd, tmp_path / "dec.pt")
    with pytest.raises(
        OpenAIImportError,
        match=r"bad\.pt \(encoder\): blocks\.group_2\.block_1\.res_path\.conv_2\.w "
        r"has shape \(32, 32, 1, 1\), expected \(32, 32, 3, 3\)",
    ):
        load_openai_dvae(tmp_path / "bad.pt", tmp_path / "dec.pt", image_size=SIZE)
    missing = {k: v for k, v in dec_sd.items() if k != "blocks.group_3.block_1.res_path.conv_3.b"}
    gone = r"decoder \(decoder\): missing key blocks\.group_3\.block_1\.res_path\.conv_3\.b"
    with pytest.raises(OpenAIImportError, match=gone):
        dvae_from_openai_state_dicts(enc_sd, missing, image_size=SIZE)
    with pytest.raises(
        OpenAIImportError,
        match=r"decoder\.pkl \(encoder\): holds a pickled dall_e\.decoder\.Decoder "
        r"\(the decoder: pass ENCODER then DECODER\)",
    ):
        load_openai_dvae(folder / "decoder.pkl", folder / "encoder.pkl")
    with pytest.raises(OpenAIImportError, match=r"nope\.pkl \(encoder\): no such file"):
        load_openai_dvae(tmp_path / "nope.pkl", folder / "decoder.pkl")
