"""Caption tokenizer: lowercased BPE with BPE dropout at training time (PAPER §2).

Built on the `tokenizers` library:

* Normaliser: NFKC, then lowercase (when `TokenizerConfig.lowercase`), runs of whitespace collapsed to
  one space and the ends stripped. `normalize(text)` exposes it; `decode(encode(c)) == normalize(c)`
  for any caption made of characters seen in training.
* Pre-tokeniser: Metaspace (each word gets a leading "▁", so decoding restores the spaces exactly)
  followed by a punctuation split (so "red," is "▁red" + ","; the comma decodes back glued to "red").
* Model: BPE trained on the captions, special tokens "[PAD]" = 0 and "[UNK]" = 1, at most
  `cfg.vocab_size` entries (the initial alphabet is capped so the limit holds even for tiny
  vocabularies). `vocab_size` is the size actually learned, which may be smaller: the prior's
  embedding table is sized by the config, so only `<=` matters.
* BPE dropout is a property of a `tokenizers` BPE model, so two tokenizer objects are kept: one
  without dropout (used by default, for validation and for sampling) and one with
  `cfg.bpe_dropout`, used only when `encode(..., train=True)`. Sampling can therefore never see dropout.
  Note that the library draws dropout from its own thread-local RNG, which torch/numpy seeds do not
  control: training batches are not bit-reproducible when bpe_dropout > 0.
* Pads: the tokenizer emits id 0 only for empty slots, right-padded up to `cfg.text_len`. The prior
  turns the pad in slot p into its own per-position pad embedding (PAPER §2). A literal "[PAD]" in a
  caption would otherwise match the special token, so any 0 produced from text is mapped to "[UNK]".
* Captions longer than `cfg.text_len` tokens are truncated, with one warning per tokenizer instance.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_ds.config import TokenizerConfig

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)  # ids 0 and 1, in this order
METASPACE = "▁"


def _build_untrained(cfg: TokenizerConfig) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    steps = [normalizers.NFKC()]
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    return tok


def _with_dropout(tok: Tokenizer, dropout: float | None) -> Tokenizer:
    """A copy of `tok` whose BPE model has the given dropout (None = deterministic)."""
    data = json.loads(tok.to_str())
    data["model"]["dropout"] = dropout if dropout else None
    return Tokenizer.from_str(json.dumps(data))


class CaptionTokenizer:
    """BPE caption tokenizer with fixed-length padded output; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, cfg: TokenizerConfig) -> None:
        """Wrap a trained `tokenizers.Tokenizer`; prefer `train`, `from_json` or `load`."""
        for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, UNK_ID)):
            got = tokenizer.token_to_id(token)
            if got != expected:
                raise ValueError(f"tokenizer: special token {token} must have id {expected}, got {got}")
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > cfg.vocab_size:
            raise ValueError(
                f"tokenizer.vocab_size: the tokenizer has {size} tokens but the config allows "
                f"{cfg.vocab_size}; retrain it or raise tokenizer.vocab_size"
            )
        self.cfg = cfg
        self._tok = _with_dropout(tokenizer, None)  # deterministic: validation and sampling
        self._tok_dropout = _with_dropout(tokenizer, cfg.bpe_dropout) if cfg.bpe_dropout > 0 else self._tok
        self._warned_truncation = False

    # ------------------------------------------------------------------------------------------
    # Construction and (de)serialisation

    @classmethod
    def train(cls, captions: Iterable[str], cfg: TokenizerConfig) -> CaptionTokenizer:
        """Learn a BPE vocabulary of at most `cfg.vocab_size` tokens (specials included)."""
        tok = _build_untrained(cfg)
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            limit_alphabet=max(cfg.vocab_size - len(SPECIAL_TOKENS), 1),  # the alphabet must fit too
            show_progress=False,
        )
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tok, cfg)

    def to_json(self) -> str:
        """The deterministic tokenizer as `tokenizers` JSON (dropout is re-applied from the config)."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str, cfg: TokenizerConfig) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(text), cfg)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, cfg: TokenizerConfig) -> CaptionTokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), cfg)

    # ------------------------------------------------------------------------------------------
    # Properties

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def vocab_size(self) -> int:
        """Tokens actually learned (specials included); <= cfg.vocab_size."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def text_len(self) -> int:
        return self.cfg.text_len

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it (NFKC, lowercase, single spaces, stripped)."""
        return self._tok.normalizer.normalize_str(text)

    # ------------------------------------------------------------------------------------------
    # Encoding and decoding

    def _finish(self, ids: list[int]) -> list[int]:
        ids = [UNK_ID if i == PAD_ID else i for i in ids]  # a literal "[PAD]" in the text
        if len(ids) > self.cfg.text_len:
            if not self._warned_truncation:
                self._warned_truncation = True
                warnings.warn(
                    f"a caption of {len(ids)} tokens was truncated to tokenizer.text_len="
                    f"{self.cfg.text_len} (further truncations are not reported)",
                    stacklevel=3,
                )
            ids = ids[: self.cfg.text_len]
        return ids

    def encode(self, caption: str, *, train: bool = False) -> list[int]:
        """Token ids of one caption (no padding), at most text_len; BPE dropout only if train."""
        tok = self._tok_dropout if train else self._tok
        return self._finish(tok.encode(caption, add_special_tokens=False).ids)

    def encode_batch(self, captions: Sequence[str], *, train: bool = False) -> torch.Tensor:
        """LongTensor (B, text_len): ids right-padded with pad id 0."""
        tok = self._tok_dropout if train else self._tok
        encs = tok.encode_batch(list(captions), add_special_tokens=False)
        out = torch.full((len(encs), self.cfg.text_len), PAD_ID, dtype=torch.long)
        for row, enc in enumerate(encs):
            ids = self._finish(enc.ids)
            if ids:
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of the ids, skipping pads ("[UNK]" stays visible)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids if int(i) != PAD_ID], skip_special_tokens=False)

    def decode_batch(self, batch: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return (
            f"CaptionTokenizer(vocab_size={self.vocab_size}/{self.cfg.vocab_size}, "
            f"text_len={self.cfg.text_len}, bpe_dropout={self.cfg.bpe_dropout})"
        )
