"""Caption retrieval top-1: the real-data benchmark's measure of whether a picture shows its caption."""

import numpy as np
import pytest
import torch

from dalle_ds.demo.real import retrieval_by_group
from dalle_ds.eval.retrieval import candidate_sets, caption_retrieval_hits, caption_retrieval_top1, top1


def test_top1_by_hand():
    """Row 0 wins, row 1 loses, row 2 ties (not a win): 1/3."""
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.7, 0.7, 0.0]])
    assert top1(scores) == pytest.approx(1 / 3)


def test_candidate_sets_own_first_distinct_never_own():
    caps = ["a cat", "a dog", "a cat", "an owl", "a bus"]
    sets = candidate_sets(caps, k=3, seed=1)
    for cap, s in zip(caps, sets):
        assert s[0] == cap and len(set(s)) == 3 and cap not in s[1:]
    with pytest.raises(ValueError, match="distinct captions"):
        candidate_sets(caps, k=5)


class ColourReranker:
    """Scores 1 when the picture's red value / 50 equals the number in the caption ("item 3"), else 0."""

    def score(self, images, captions):
        return torch.tensor([float(im[0, 0, 0] // 50 == int(c.split()[1])) for im, c in zip(images, captions)])


def test_caption_retrieval_hand_example():
    """Four pictures: 0, 1 and 2 show their captions' items; picture 3 shows item 0's, whose caption is
    among picture 3's candidates (k = 4 with four captions: every caption is a candidate). 3/4 win."""
    caps = [f"item {i}" for i in range(4)]
    images = np.zeros((4, 2, 2, 3), np.uint8)
    for i, shown in enumerate([0, 1, 2, 0]):
        images[i] = shown * 50
    assert caption_retrieval_top1(ColourReranker(), images, caps, k=4) == pytest.approx(3 / 4)


def test_hits_per_picture_and_split_by_caption_group():
    """The hand example row by row (picture 3 loses), then split into two groups of captions: pictures
    0 and 3 in one (1 of 2 wins), 1 and 2 in the other (2 of 2); an empty group is None, not 0."""
    caps = [f"item {i}" for i in range(4)]
    images = np.zeros((4, 2, 2, 3), np.uint8)
    for i, shown in enumerate([0, 1, 2, 0]):
        images[i] = shown * 50
    hits = caption_retrieval_hits(ColourReranker(), images, caps, k=4)
    assert hits.tolist() == [True, True, True, False]
    seen = np.array([True, False, False, True])
    assert retrieval_by_group(ColourReranker(), images, caps, seen, 4, 0) == (0.75, 0.5, 1.0)
    assert retrieval_by_group(ColourReranker(), images, caps, np.ones(4, bool), 4, 0) == (0.75, 0.75, None)
