"""``squeezer.train.fit`` on data whose last batch holds one sample."""

import torch
from torch import nn

import squeezer as sq
from squeezer.data import Classification
from squeezer.train import fit


def test_a_last_batch_of_one_sample_does_not_stop_a_batchnorm_net(digits):
    # 65 training samples in batches of 64: the second batch of every epoch is one sample,
    # on which BatchNorm cannot compute a variance; that sample sits out and training goes on
    data = sq.Dataset("digits65", digits.x_train[:65], digits.y_train[:65], digits.x_test[:32],
                      digits.y_test[:32], Classification(), {"classes": 10})  # fmt: skip
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 10))  # fmt: skip
    trained, info = fit(net, data, epochs=2, batch_size=64, seed=0)
    assert torch.isfinite(torch.tensor(info["final_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), trained.parameters(), strict=True))
