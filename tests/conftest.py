"""Shared fixtures."""
import pytest


@pytest.fixture
def tiny_cfg():
    from dalle_ds.config import load_config

    # BPE dropout draws from an unseeded RNG inside `tokenizers`; runs compared step by step turn it off.
    return load_config("tiny", overrides=["tokenizer.bpe_dropout=0", "prior_train.log_every=1"])
