"""engine/identity_neighbours.py: per-identity means and the symmetric cross-modal neighbour lists, by hand."""
from __future__ import annotations

import torch

from engine.identity_neighbours import nearest_identities, per_identity_mean


def test_per_identity_mean_normalises_each_feature_then_the_mean():
    features = torch.tensor([[3.0, 0.0], [0.0, 0.5], [0.0, 2.0]])
    means = per_identity_mean(features, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(means, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]]))


def test_nearest_identities_rank_by_the_symmetric_cross_modal_cosine_never_oneself(monkeypatch):
    import engine.identity_neighbours as module

    angle = torch.tensor([0.0, 0.3, 1.0, 1.2])  # texts; each identity's images sit a little off its texts
    texts = torch.stack([angle.cos(), angle.sin()], dim=1)
    images = torch.stack([(angle + 0.05).cos(), (angle + 0.05).sin()], dim=1)
    expected = [[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 1, 0]]
    assert nearest_identities(texts, images, 3).tolist() == expected
    assert nearest_identities(texts, images, 8).shape == (4, 3)  # at most the others
    monkeypatch.setattr(module, "SIMILARITY_ROWS", 3)  # row blocks of 3 and 1 give the same lists
    assert nearest_identities(texts, images, 2).tolist() == [row[:2] for row in expected]
    # the symmetric score: a's texts to b's images and b's texts to a's images, averaged
    similarity = 0.5 * (texts @ images.T + images @ texts.T)
    assert similarity[2, 3] > similarity[2, 1] > similarity[2, 0]
