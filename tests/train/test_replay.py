"""Hard-negative replay: the old images most like the new classes come first, and a share of the
replay is drawn from them without changing its size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.data.loading import TensorSplit
from tasks.train.replay import confusable_ranking, embeddings, replay_sample, training_set


class MeanColour(nn.Module):
    """A 'model' whose features are the image's mean colour: red images sit together, blue ones apart."""

    def forward(self, x):
        return x.mean((2, 3))


def _image(rgb, n):
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, 8, 8).clone()


def _split():
    # class 0 (old): 20 blue images then 10 reddish ones; class 1 (old): 30 green; class 2 (new): 15 red.
    images = torch.cat([_image((10, 10, 220), 20), _image((200, 40, 30), 10), _image((20, 200, 20), 30),
                        _image((230, 20, 20), 15)])
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 15)
    return TensorSplit(images, labels, ["a", "b", "new"], [f"{i}.png" for i in range(len(labels))])


@pytest.mark.timeout(60)
def test_the_old_images_like_the_new_class_rank_first():
    split = _split()
    ranked = confusable_ranking(MeanColour(), split, [2], torch.device("cpu"), torch.Generator().manual_seed(0))
    assert sorted(ranked.tolist()) == list(range(60))  # every old image, no new one
    assert set(ranked[:10].tolist()) == set(range(20, 30))  # the reddish old images first
    feats = embeddings(MeanColour(), split.images[:5], torch.device("cpu"))
    assert torch.allclose(feats.norm(dim=1), torch.ones(5))


@pytest.mark.timeout(60)
def test_a_hard_share_of_the_replay_comes_from_the_top_of_the_ranking_and_keeps_its_size():
    split = _split()
    ranked = confusable_ranking(MeanColour(), split, [2], torch.device("cpu"), torch.Generator().manual_seed(0))
    plain = replay_sample(split.labels, [2], 0.5, torch.Generator().manual_seed(1))
    hard = replay_sample(split.labels, [2], 0.5, torch.Generator().manual_seed(1), ranked, hard_share=0.4)
    assert len(hard) == len(plain) == 15
    assert len(set(hard.tolist())) == len(hard) and not (split.labels[hard] == 2).any()
    reddish = set(range(20, 30))
    # 0.4 x 15 = 6 drawn from the top 12 (the 10 reddish + 2 next); a uniform sample holds ~2.5 of them
    assert len(reddish & set(hard.tolist())) >= 4
    assert len(reddish & set(hard.tolist())) > len(reddish & set(plain.tolist()))
    epoch = training_set(split, ["new"], 0.5, 1, ranked, 0.4)
    assert int((epoch.labels == 2).sum()) == 15 and len(epoch) == 30


@pytest.mark.timeout(60)
def test_an_excluded_class_is_left_out_of_the_ranking():
    # A refined class's parent: its images are the nearest, and the refinement rule answers them.
    split = _split()
    ranked = confusable_ranking(MeanColour(), split, [2], torch.device("cpu"), torch.Generator().manual_seed(0),
                                exclude=[0])
    assert sorted(ranked.tolist()) == list(range(30, 60))  # only class 1's images
