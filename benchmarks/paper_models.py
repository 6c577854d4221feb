"""The paper's CNNs rebuilt from public descriptions, for reproducing its memory accounting.

Only the architectures: the MCUNet/tiny-training ImageNet checkpoints are not obtainable
offline, so these start from random weights and serve shape/cost checks, not accuracy.
"""

from __future__ import annotations

from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """The MobileNet width rule: round to a multiple of ``divisor``, never lose more than 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=False)]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=False),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 as in the MCUNet / tiny-training model zoo.

    ``mobilenet_v2_w035()`` is "mbv2-w0.35": width multiplier 0.35, widths divisible by 8,
    last conv 448 channels (1280 × 0.35, not kept at 1280), 52 convolutions.
    """

    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, width: float = 0.35, num_classes: int = 1000, last_channels: int = 1280):
        super().__init__()
        cin = make_divisible(32 * width)
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=False))
        ]
        for expand, c, n, s in self.SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand))
                cin = cout
        last = make_divisible(last_channels * width)
        features.append(
            nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=False))
        )
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mobilenet_v2_w035(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(width=0.35, num_classes=num_classes)


def mobilenet_v2_w035_10() -> MobileNetV2:
    """MobileNetV2-w0.35 with a 10-class head (a downstream task): the README's memory report model."""
    return mobilenet_v2_w035(num_classes=10)


class MCUNet(nn.Module):
    """An MCUNet / ProxylessNAS-style net: stem conv, inverted residual blocks with per-block
    expansion and kernel size, global pooling, classifier (no final 1x1 mixing conv)."""

    def __init__(
        self, stem: int, blocks: list[tuple[int, int, int, int]], num_classes: int = 1000, mix: int | None = None
    ):
        super().__init__()
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=False))
        ]
        cin = stem
        for expand, cout, stride, kernel in blocks:
            if expand == 0:  # a searched-away ("zero") block: identity
                continue
            features.append(InvertedResidual(cin, cout, stride, expand, kernel))
            cin = cout
        if mix:  # ProxylessNAS's final 1x1 "feature mix" conv
            features.append(nn.Sequential(nn.Conv2d(cin, mix, 1, bias=False), nn.BatchNorm2d(mix), nn.ReLU6()))
            cin = mix
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mcunet_in1(num_classes: int = 1000) -> MCUNet:
    """MCUNet-in1 ("mcunet-5fps_imagenet" of the MCUNet model zoo): (expand, out, stride, kernel) per block,
    from the zoo's public configuration."""
    blocks = [
        (1, 8, 1, 3),
        (4, 16, 2, 3),
        (3, 16, 1, 3),
        (3, 24, 2, 7),
        (5, 24, 1, 3),
        (5, 40, 2, 3),
        (4, 40, 1, 7),
        (4, 48, 1, 5),
        (3, 48, 1, 3),
        (4, 48, 1, 3),
        (5, 96, 2, 7),
        (4, 96, 1, 5),
        (4, 96, 1, 5),
        (6, 160, 1, 3),
    ]
    return MCUNet(16, blocks, num_classes)


def proxyless_w03(num_classes: int = 1000) -> MCUNet:
    """ProxylessNAS-w0.3 ("proxyless-w0.3-r176_imagenet" of the MCUNet model zoo), from the zoo's public
    configuration; two searched-away blocks are identities (expand 0 below); feature mix conv 96 -> 384."""
    blocks = [
        (1, 8, 1, 3),
        (3, 16, 2, 5),
        (3, 16, 1, 3),
        (0, 16, 1, 0),
        (0, 16, 1, 0),
        (3, 16, 2, 7),
        (3, 16, 1, 3),
        (3, 16, 1, 5),
        (3, 16, 1, 5),
        (6, 24, 2, 7),
        (3, 24, 1, 5),
        (3, 24, 1, 5),
        (3, 24, 1, 5),
        (6, 32, 1, 5),
        (3, 32, 1, 5),
        (3, 32, 1, 5),
        (3, 32, 1, 5),
        (6, 64, 2, 7),
        (6, 64, 1, 7),
        (3, 64, 1, 7),
        (3, 64, 1, 7),
        (6, 96, 1, 7),
    ]
    return MCUNet(16, blocks, num_classes, mix=384)


def bert_like(num_labels: int = 2):
    """A BERT-style encoder classifier built from config (random weights): 4 layers, hidden 256."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=256,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def llama_like():
    """A Llama-style decoder built from config (random weights): 4 layers, hidden 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)
