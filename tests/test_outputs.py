"""Models whose output is not a plain logits tensor (GoogLeNet's and Inception v3's namedtuples
with auxiliary logits in train mode, dicts, dataclasses): read in one place, fxsparse.outputs."""
from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse import outputs
from fxsparse.errors import FxSparseError

AuxOutputs = namedtuple("AuxOutputs", ["logits", "aux_logits"])  # as torchvision's InceptionOutputs


class _AuxNet(nn.Module):
    """Returns (logits, aux logits) as a namedtuple in train mode, the logits alone in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.aux = nn.Conv2d(3, 8, 3), nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        if self.training:
            return AuxOutputs(self.fc(h), self.aux(h))
        return self.fc(h)


@dataclasses.dataclass
class _Out:
    hidden: int
    scores: torch.Tensor


def test_logits_of_every_output_form():
    t, u = torch.randn(2, 3), torch.randn(2, 3)
    assert outputs.logits(t) is t
    assert outputs.logits(AuxOutputs(t, u)) is t
    assert outputs.logits(AuxOutputs(logits=u, aux_logits=t)) is u  # by name, not position
    assert outputs.logits({"aux": u, "logits": t}) is t
    assert outputs.logits((None, [t, u])) is t
    assert outputs.logits(_Out(3, t)) is t
    with pytest.raises(FxSparseError, match="no tensor"):
        outputs.logits((1, "a"))
    scaled = outputs.map_tensors(AuxOutputs(t, u), lambda x: x / 2)
    assert isinstance(scaled, AuxOutputs) and torch.equal(scaled.aux_logits, u / 2)


@pytest.mark.parametrize("method", ["taylor", "snip", "grasp", "synflow"])
def test_data_driven_masks_score_a_model_with_auxiliary_logits(method):
    # GraSP divided the namedtuple by its temperature (TypeError: unsupported operand type(s) for
    # /: 'GoogLeNetOutputs' and 'float'); the others gave it to F.cross_entropy as it was
    torch.manual_seed(0)
    model = _AuxNet().train()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    masks = fxsparse.masks.compute(model, method=method, sparsity=0.5, data=[(x, y)],
                                   **({"rounds": 2} if method == "synflow" else {}))
    assert sum(int(m.sum()) for m in masks.values()) == sum(m.numel() for m in masks.values()) // 2


def test_grasp_default_loss_reads_the_logits_and_a_custom_loss_gets_every_output():
    torch.manual_seed(0)
    model = _AuxNet().train()
    data = [(torch.randn(2, 3, 8, 8), torch.tensor([1, 3]))]
    seen = []

    def loss_with_aux(out, y):
        seen.append(type(out))
        return torch.nn.functional.cross_entropy(out.logits, y) + 0.3 * torch.nn.functional.cross_entropy(out.aux_logits, y)

    with_aux = fxsparse.masks.score(model, "grasp", data, loss_with_aux)
    assert seen and all(t is AuxOutputs for t in seen)
    assert with_aux["aux.weight"].abs().sum() > 0  # the aux head is scored through the custom loss
    plain = fxsparse.masks.score(model, "grasp", data)
    assert plain["aux.weight"].abs().sum() == 0  # the default loss reads the logits only
