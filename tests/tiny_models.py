"""Tiny models and datasets built from code or config (no network), shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


# ------------------------------------------------------------------------------ layers
class Holder(nn.Module):
    """Wraps one layer under the name ``layer``, so a config can target it."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def padded_conv(stock: type, *args, static_padding: nn.Module, **kwargs) -> nn.Module:
    """A ``stock`` convolution subclass that runs ``static_padding`` before itself."""

    class PaddedConv(stock):
        def forward(self, x):
            return self._conv_forward(self.static_padding(x), self.weight, self.bias)

    conv = PaddedConv(*args, **kwargs)
    conv.static_padding = static_padding
    return conv


class StaticSamePaddingConv(nn.Conv2d):
    """Like the EfficientNet ports: a padding module runs before an unpadded convolution."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, 1, self.groups)


# ------------------------------------------------------------------------ vision models
class SmallCNN(nn.Module):
    """A MobileNet-like block stack: a stem conv, a depthwise conv, a grouped conv, a classifier."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU6()
        self.pw = nn.Conv2d(8, 16, 1, groups=2)
        self.act3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, pixel_values, labels=None):
        x = self.act1(self.bn1(self.stem(pixel_values)))
        x = self.act2(self.bn2(self.dw(x)))
        x = self.act3(self.pw(x))
        logits = self.classifier(self.pool(x).flatten(1))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def tiny_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def tiny_cnn_adapter(seed: int = 0):
    """The tiny CNN under a TraDy adapter (2 channels per layer, random deltas) after three periods."""
    from peft import get_peft_model

    import trady_peft

    torch.manual_seed(seed)
    model = get_peft_model(tiny_cnn(), trady_peft.TraDyConfig(channels_per_layer=2, init_weights=False))
    for _ in range(3):
        model.base_model.next_period()
    return model


def paper_mobilenet_v2() -> nn.Module:
    """The paper's MobileNetV2-w0.35 (benchmarks/paper_models.py) with 10 classes, in eval mode."""
    from paper_models import mobilenet_v2_w035  # benchmarks/, on pytest's pythonpath

    torch.manual_seed(0)
    return mobilenet_v2_w035(num_classes=10).eval()


def conv_names(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.Conv2d`` layers, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


# -------------------------------------------------------------------------- text models
def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, vocab 64) in eval mode; ``overrides`` replace its config fields."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()


def tiny_bert() -> nn.Module:
    """A 2-layer BERT sequence classifier (3 labels) with the stock dropouts (0.1), in training mode."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config).train()


# ------------------------------------------------------------------------------- data
class CountingText(Dataset):
    """Token sequences that count upward mod the vocabulary: easy to learn, so loss must drop."""

    def __init__(self, n=128, length=16, vocab=64):
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class ColourImages(Dataset):
    """Images whose class is the colour channel that is brightest."""

    def __init__(self, n=128):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.images = torch.randn(n, 3, 16, 16, generator=g) * 0.5
        self.images[torch.arange(n), self.labels] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def colour_images_loader(n: int = 64, batch_size: int = 8, seed: int = 0):
    """A dataloader of images whose class is their brightest colour channel (for rank-layers tests)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    images[torch.arange(n), labels] += 1.0
    dataset = TensorDataset(images, labels)
    collate = lambda rows: {  # noqa: E731
        "pixel_values": torch.stack([r[0] for r in rows]),
        "labels": torch.stack([r[1] for r in rows]),
    }
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
