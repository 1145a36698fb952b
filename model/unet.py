"""One configurable U-Net for separating a mixture into its two 32x32 components.

The family spans the reference solution (preset `reference`, 3,684,214 parameters) and the
small variants a sweep explores. Every knob is a field of `UNetConfig`; a preset is data.

    mixture (B,1,32,32) -> encoder (depth steps, width doubling) -> bottleneck
      -> decoder (depth steps, width = skip width * decoder_width_mult; skips optionally
         gated) -> 1x1 conv to 2 (or to 1, the Fashion item, the digit derived)
      -> optional depthwise 3x3 head -> optional mixture-consistency projection
      -> components (B,2,32,32); laid side by side they are the task's 32x64 target.
Each step is plain convolutions, a residual block or NAF blocks (`block`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

IMAGE_SIZE = 32
MIXTURES = ("mean", "sum")
BLOCKS = ("plain", "residual", "naf")
UPSAMPLES = ("transpose", "bilinear")
OUTPUTS = ("both", "one")


class ConfigError(ValueError):
    """A config value that cannot build a model; the message names the field."""


@dataclass(frozen=True)
class UNetConfig:
    base_filters: int = 16  # width of the first encoder step; doubled per step down
    depth: int = 2  # number of down (and up) steps; 32 / 2**depth must stay >= 2
    enc_convs: int = 2  # 3x3 convolutions per encoder step (and in the bottleneck)
    dec_convs: int = 2  # 3x3 convolutions per decoder step
    # Decoder width over the matching skip width: 1 is a standard U-Net, 4 is the
    # reference's "4x wider on the way up" (the bottleneck width multiplier).
    decoder_width_mult: int = 1
    depthwise_head: bool = True  # a depthwise 3x3 conv after the 1x1 output conv
    batch_norm: bool = True
    # Batch norm as the CIFAR-10 speedruns use it: bn_scale false drops the learned scale
    # (a learned shift only; fewer parameters), bn_momentum ~0.4 lets the running
    # statistics follow fast-moving weights. The defaults are torch's.
    bn_scale: bool = True
    bn_momentum: float = 0.1
    # Project the outputs onto img1 + img2 = mixture * scale: can only help (task notes).
    mixture_consistent: bool = True
    mixture: str = "mean"  # "mean": input (img1 + img2) / 2; "sum": input img1 + img2
    # plain: [conv3x3-BN-ReLU] x n; residual: the same with a 1x1 shortcut (every step
    # changes width; identity where widths match);
    # naf: NAFNet blocks (LayerNorm, gated depthwise conv, channel attention), n per step.
    block: str = "plain"
    upsample: str = "transpose"  # transposed conv 2x2, or bilinear x2 then conv 3x3
    attention_gates: bool = False  # gate each skip by the decoder's features (Oktay 2018)
    # both: predict both components; one: predict the Fashion item and derive the digit
    # as scale * mixture - fashion, consistent by construction (mixture_consistent is moot).
    output: str = "both"

    def __post_init__(self) -> None:
        for name, low, high in (
            ("base_filters", 1, 1024),
            ("depth", 1, 4),
            ("enc_convs", 1, 8),
            ("dec_convs", 1, 8),
            ("decoder_width_mult", 1, 16),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
        for name in ("depthwise_head", "batch_norm", "bn_scale", "mixture_consistent",
                     "attention_gates"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if (isinstance(self.bn_momentum, bool) or not isinstance(self.bn_momentum, int | float)
                or not 0 < self.bn_momentum <= 1):
            raise ConfigError(f"bn_momentum must be in (0, 1], got {self.bn_momentum!r}")
        for name, choices in (("mixture", MIXTURES), ("block", BLOCKS),
                              ("upsample", UPSAMPLES), ("output", OUTPUTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, "
                                  f"got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        """Build from a dict, refusing unknown keys (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, UNetConfig] = {
    # The reference solution as published: Keras, biases everywhere, no normalization,
    # plain outputs. Parameter count 3,684,214 exactly.
    "reference": UNetConfig(
        base_filters=32,
        depth=2,
        enc_convs=2,
        dec_convs=4,
        decoder_width_mult=4,
        depthwise_head=True,
        batch_norm=False,
        mixture_consistent=False,
    ),
    # A standard U-Net at 7% of the reference's size: within the tenth we aim to win at.
    "small": UNetConfig(base_filters=24, depth=2, enc_convs=2, dec_convs=2),
    # The smallest sensible member: for smoke runs, tests and load tests.
    "tiny": UNetConfig(base_filters=4, depth=1, enc_convs=1, dec_convs=1),
}


def preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class BatchNormStyle:
    scale: bool = True  # a learned scale (torch's default); false: a learned shift only
    momentum: float = 0.1  # of the running statistics

    def layer(self, channels: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(channels, momentum=self.momentum)
        if not self.scale:
            bn.weight = None  # normalize, then shift: F.batch_norm takes no scale then
        return bn


def conv_block(in_ch: int, out_ch: int, n_convs: int, batch_norm: bool,
               bn: BatchNormStyle = BatchNormStyle()) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        # With batch norm right after, a conv bias is redundant.
        layers.append(nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1,
                                bias=not batch_norm))
        if batch_norm:
            layers.append(bn.layer(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """conv_block's convolutions with a shortcut: ReLU(body(x) + shortcut(x)). The body's
    last batch norm starts at zero, so the block starts as its shortcut and deep stacks
    train from the first step (Goyal et al. 2017)."""

    def __init__(self, in_ch: int, out_ch: int, n_convs: int, batch_norm: bool,
                 bn: BatchNormStyle = BatchNormStyle()) -> None:
        super().__init__()
        body = list(conv_block(in_ch, out_ch, n_convs, batch_norm, bn))
        self.body = nn.Sequential(*body[:-1])  # the last ReLU comes after the sum
        if batch_norm and bn.scale:  # without a scale there is none to start at zero
            nn.init.zeros_(self.body[-1].weight)
        self.shortcut = (nn.Identity() if in_ch == out_ch else
                         nn.Conv2d(in_ch, out_ch, 1, bias=not batch_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel, as NAFNet's LayerNorm2d."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """One block of NAFNet (Chen et al. 2022, "Simple Baselines for Image Restoration"):
    a gated depthwise-conv half and a gated feed-forward half, each residual with a learned
    scale that starts at zero. About 7c^2 parameters against 18c^2 for two 3x3 convs."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            ChannelLayerNorm(c), nn.Conv2d(c, 2 * c, 1),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), SimpleGate())
        # Simplified channel attention: global average pool, 1x1, multiply.
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.project = nn.Conv2d(c, c, 1)
        self.feed_forward = nn.Sequential(
            ChannelLayerNorm(c), nn.Conv2d(c, 2 * c, 1), SimpleGate(), nn.Conv2d(c, c, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial(x)
        x = x + self.beta * self.project(y * self.attention(y))
        return x + self.gamma * self.feed_forward(x)


def naf_stage(in_ch: int, out_ch: int, n_blocks: int) -> nn.Sequential:
    """A 3x3 conv to the step's width, then n NAF blocks at that width."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1),
                         *(NAFBlock(out_ch) for _ in range(n_blocks)))


def make_stage(block: str, in_ch: int, out_ch: int, n: int, batch_norm: bool,
               bn: BatchNormStyle = BatchNormStyle()) -> nn.Module:
    """One step of the U-Net at one resolution, of the config's block type."""
    if block == "naf":
        return naf_stage(in_ch, out_ch, n)
    if block == "residual":
        return ResidualBlock(in_ch, out_ch, n, batch_norm, bn)
    return conv_block(in_ch, out_ch, n, batch_norm, bn)


def make_upsample(kind: str, in_ch: int, out_ch: int) -> nn.Module:
    if kind == "bilinear":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                             nn.Conv2d(in_ch, out_ch, 3, padding=1))
    return nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)


class AttentionGate(nn.Module):
    """Additive attention on a skip (Oktay et al. 2018, "Attention U-Net"): a per-pixel
    weight in (0, 1) from the skip and the decoder's upsampled features multiplies the skip,
    so the decoder can drop what belongs to the other component."""

    def __init__(self, skip_ch: int, gate_ch: int) -> None:
        super().__init__()
        inner = max(1, skip_ch // 2)
        self.from_skip = nn.Conv2d(skip_ch, inner, 1, bias=False)
        self.from_gate = nn.Conv2d(gate_ch, inner, 1)
        self.weight = nn.Conv2d(inner, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.from_skip(skip) + self.from_gate(gate))
        return skip * torch.sigmoid(self.weight(a))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        skip_widths = [c.base_filters * 2**i for i in range(c.depth)]
        bn = BatchNormStyle(c.bn_scale, c.bn_momentum)

        self.down = nn.ModuleList()
        in_ch = 1
        for width in skip_widths:
            self.down.append(make_stage(c.block, in_ch, width, c.enc_convs, c.batch_norm, bn))
            in_ch = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = make_stage(c.block, in_ch, c.base_filters * 2**c.depth, c.enc_convs,
                                     c.batch_norm, bn)
        in_ch = c.base_filters * 2**c.depth

        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        self.gates = nn.ModuleList()  # empty unless attention_gates: no keys in the weights
        for skip in reversed(skip_widths):
            width = skip * c.decoder_width_mult
            self.upsample.append(make_upsample(c.upsample, in_ch, width))
            if c.attention_gates:
                self.gates.append(AttentionGate(skip, width))
            self.up.append(make_stage(c.block, width + skip, width, c.dec_convs, c.batch_norm,
                                      bn))
            in_ch = width

        out_ch = 1 if c.output == "one" else 2
        head: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 1)]
        if c.depthwise_head:
            head.append(nn.Conv2d(out_ch, out_ch, 3, padding=1, groups=out_ch))
        self.head = nn.Sequential(*head)
        # Mean mixture: img1 + img2 = 2 * input; sum mixture: img1 + img2 = input.
        self.mixture_scale = 2.0 if c.mixture == "mean" else 1.0

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        x = mixture
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i, (upsample, block, skip) in enumerate(
                zip(self.upsample, self.up, reversed(skips), strict=True)):
            x = upsample(x)
            if self.config.attention_gates:
                skip = self.gates[i](skip, x)
            x = block(torch.cat([x, skip], dim=1))
        y = self.head(x)
        if self.config.output == "one":  # y is the Fashion item; the digit is what is left
            return torch.cat([self.mixture_scale * mixture - y, y], dim=1)
        if self.config.mixture_consistent:
            # Spread the residual of the sum constraint equally over both components.
            residual = self.mixture_scale * mixture - y.sum(dim=1, keepdim=True)
            y = y + residual / 2
        return y


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def params_of(config: UNetConfig) -> int:
    """Parameter count without keeping the model: cheap enough for a search space. Cached:
    the sweep's report asks it for every trial each time a trial ends, and building even
    a meta-device model took ~10 ms, 90% of a 16-trial report's rewrite."""
    with torch.device("meta"):
        return count_params(UNet(config))


def train_flops_per_sample(config: UNetConfig) -> int:
    """FLOPs of one training step per sample (forward + backward), counted by torch on the
    meta device: the same count as on the CPU, without the arithmetic (0.1 s, not 2-4 s
    for `reference`)."""
    with torch.device("meta"):
        model = UNet(config)
        x = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
        with FlopCounterMode(display=False) as counter:
            model(x).square().mean().backward()
    return counter.get_total_flops() // 2
