"""The CLIP BPE tokenizer (open_clip's SimpleTokenizer, itself OpenAI's), over the vocabulary file shipped in
open_clip_torch. Same cleaning (ftfy, html unescape, whitespace, lower case), same split pattern (needs the
`regex` module for \\p{L}), same truncation: ids are [SOT, tokens..., EOT, 0...], cut to the context length
with EOT kept last. tests/data/open_clip/ holds open_clip's own ids for comparison.
"""

from __future__ import annotations

import gzip
import html
import string
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

from dalle_ds.rerank.open_clip_config import package_file


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode char map, so BPE never sees whitespace/control bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace(text: str) -> str:
    return " ".join(text.split()).strip()


_CLEAN = {
    "lower": lambda t: _whitespace(_basic_clean(t)).lower(),
    "whitespace": lambda t: _whitespace(_basic_clean(t)),
    "canonicalize": lambda t: _whitespace(
        _basic_clean(t).replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    ),
}


class ClipTokenizer:
    def __init__(self, context_length: int = 77, clean: str = "lower", vocab: str | Path | None = None):
        if clean not in _CLEAN:
            raise ValueError(f"unknown open_clip tokenizer clean mode {clean!r}")
        path = Path(vocab) if vocab else package_file("bpe_simple_vocab_16e6.txt.gz")
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        units = list(bytes_to_unicode().values())
        words = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
        specials = ["<start_of_text>", "<end_of_text>"]
        self.encoder = {w: i for i, w in enumerate(words + specials)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {s: s for s in specials}
        self.pat = regex.compile(
            "|".join(specials) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self.sot, self.eot = self.encoder[specials[0]], self.encoder[specials[1]]
        self.context_length, self.clean = context_length, _CLEAN[clean]
        self.byte_encoder = bytes_to_unicode()

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in regex.findall(self.pat, self.clean(text)):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(tok).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[i, : len(ids)] = torch.tensor(ids)
        return out
