"""Where sampling runs (dalle_ds/sampling/placement.py): the dtype matrix, device errors, and a prior in bf16
weights decoding like the fp32 one."""

import copy
import dataclasses

import pytest
import torch

from dalle_ds.config import get_preset
from dalle_ds.errors import ConfigError
from dalle_ds.prior.model import Prior
from dalle_ds.sampling.decode import sample_image_tokens
from dalle_ds.sampling.placement import sample_device, sample_dtype


@pytest.mark.parametrize(
    ("device_type", "cap", "want"),
    [
        ("cpu", None, torch.float32),
        ("cuda", (9, 0), torch.bfloat16),  # H100
        ("cuda", (8, 0), torch.bfloat16),  # A100
        ("cuda", (7, 5), torch.float16),  # T4
        ("cuda", (7, 0), torch.float16),  # V100
    ],
)
def test_auto_dtype_follows_the_training_matrix(device_type, cap, want):
    assert sample_dtype("auto", device_type, cap) == want


def test_explicit_dtypes_and_the_ones_a_device_lacks():
    assert sample_dtype("fp32", "cuda", (9, 0)) == torch.float32
    assert sample_dtype("bf16", "cpu", None) == torch.bfloat16
    assert sample_dtype("fp16", "cuda", (7, 0)) == torch.float16
    with pytest.raises(ConfigError, match="sm70 has no bf16|sm70\\) has no bf16"):
        sample_dtype("bf16", "cuda", (7, 0))
    with pytest.raises(ConfigError, match="fp16 on the CPU"):
        sample_dtype("fp16", "cpu", None)
    with pytest.raises(ConfigError, match="--dtype"):
        sample_dtype("fp8", "cuda", (9, 0))


def test_device_names():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert sample_device("auto").type == want
    assert sample_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device"):
        sample_device("not-a-device")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        sample_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            sample_device("cuda")


def test_bf16_weights_decode_like_fp32():
    """The same random prior with bf16 weights (KV cache in bf16, fp32 head): first-token logits within bf16
    rounding of the fp32 ones, and at a low temperature (sharp draws; a random prior's logits are small)
    the KV-cached decode draws nearly the same tokens from one seed, where another prior does not."""
    cfg = dataclasses.replace(get_preset("tiny").prior, attention_backend="dense")
    torch.manual_seed(0)
    fp32 = Prior(cfg).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    torch.manual_seed(5)
    other = Prior(cfg).eval()
    assert bf16.init_cache(2).k[0].dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, cfg.text_vocab_size, (8, cfg.text_len), generator=g)
    text[:, 7:] = 0
    want = fp32.prefill(text, fp32.init_cache(8))
    got = bf16.prefill(text, bf16.init_cache(8))
    assert got.dtype == torch.float32  # the head runs in fp32
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    a, b, c = (
        sample_image_tokens(m, text, temperature=0.05, generator=torch.Generator().manual_seed(3))
        for m in (fp32, bf16, other)
    )
    assert a.shape == b.shape == (8, fp32.image_len)
    assert (a == b).float().mean() >= 0.8 and (a == c).float().mean() < 0.3  # measured 0.93 and 0.05


def test_train_clip_autocast_matrix():
    """train-clip's steps: bf16 autocast on sm80+, fp32 on older GPUs (no loss scaler) and on the CPU."""
    from dalle_ds.rerank.train import autocast_dtype

    assert autocast_dtype("cuda", (9, 0)) == autocast_dtype("cuda", (8, 6)) == torch.bfloat16
    assert autocast_dtype("cuda", (7, 0)) is None and autocast_dtype("cpu", None) is None
