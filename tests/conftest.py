"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def tiny_cfg():
    from dalle_ds.config import load_config

    # BPE dropout draws from an unseeded RNG inside `tokenizers`; runs compared step by step turn it off.
    return load_config("tiny", overrides=["tokenizer.bpe_dropout=0", "prior_train.log_every=1"])


@pytest.fixture
def one_thread():
    """Small problems: one intra-op thread is faster, and avoids OpenMP spin-waits when the 2 cores are
    shared with other jobs (seen to slow these tests 100x). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
