"""find_layers: every conv paired with the BatchNorm that consumes its output."""

import torch

from polyprune.models import build_model
from polyprune.pruning.layers import find_layers


def test_find_layers_pairs_convs_with_their_batchnorm():
    torch.manual_seed(0)
    m = build_model("unet", base_width=8, depth=2)
    layers = find_layers(m, torch.zeros(1, 3, 32, 32))
    assert layers["enc0.conv1"].norm is m.enc0.bn1
    assert layers["dec1.conv2"].norm is m.dec1.bn2
    assert layers["up0"].norm is None and layers["head"].norm is None  # ConvTranspose and head: no BN
    assert layers["enc0.conv1"].feature_module is m.enc0.bn1 and layers["head"].feature_module is m.head
