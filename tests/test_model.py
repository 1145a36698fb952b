"""Tests of model.unet: shapes over the config family, parameter counts, the mixture
projection, config validation and the FLOP count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.unet import (
    PRESETS,
    ConfigError,
    UNet,
    UNetConfig,
    count_params,
    params_of,
    preset,
    train_flops_per_sample,
)

REFERENCE_PARAMS = 3_684_214


def expected_params(c: UNetConfig) -> int:
    """The parameter count worked out by hand from the architecture, independently of
    the module code: conv k*k*in*out (+ out bias, or + 2*out for batch norm's affine)."""

    def conv3(cin: int, cout: int) -> int:
        return 9 * cin * cout + (2 * cout if c.batch_norm else cout)

    def naf(ch: int) -> int:
        # two channel LayerNorms 2c each; 1x1 c->2c (x2), depthwise 3x3 over 2c, channel
        # attention 1x1 c->c, output 1x1 c->c (x2), all with bias; beta and gamma c each
        return 2 * 2 * ch + 2 * (2 * ch * ch + 2 * ch) + 20 * ch + 3 * (ch * ch + ch) + 2 * ch

    def block(cin: int, cout: int, n: int) -> int:
        if c.block == "naf":  # a 3x3 conv with bias to the width, then n NAF blocks
            return 9 * cin * cout + cout + n * naf(cout)
        plain = conv3(cin, cout) + (n - 1) * conv3(cout, cout)
        if c.block == "residual" and cin != cout:  # a 1x1 shortcut, biased without BN
            plain += cin * cout + (0 if c.batch_norm else cout)
        return plain

    skips = [c.base_filters * 2**i for i in range(c.depth)]
    total, cin = 0, 1
    for width in skips:
        total += block(cin, width, c.enc_convs)
        cin = width
    bottom = c.base_filters * 2**c.depth
    total += block(cin, bottom, c.enc_convs)
    cin = bottom
    for skip in reversed(skips):
        width = skip * c.decoder_width_mult
        kernel = 9 if c.upsample == "bilinear" else 4  # 3x3 conv after it, or 2x2 transposed
        total += kernel * cin * width + width
        if c.attention_gates:  # 1x1 skip -> skip/2 (no bias), gate -> skip/2, skip/2 -> 1
            inner = max(1, skip // 2)
            total += skip * inner + width * inner + inner + inner + 1
        total += block(width + skip, width, c.dec_convs)
        cin = width
    out = 1 if c.output == "one" else 2
    total += out * cin + out  # 1x1 output conv
    if c.depthwise_head:
        total += out * 9 + out  # depthwise 3x3 over the outputs
    return total


# Tiny widths throughout: every combination that matters, each forward pass is cheap.
VARIANTS = [
    UNetConfig(base_filters=bf, depth=d, enc_convs=e, dec_convs=dc, decoder_width_mult=m,
               depthwise_head=h, batch_norm=bn, mixture_consistent=mc, mixture=mix)
    for bf, d, e, dc, m, h, bn, mc, mix in [
        (2, 1, 1, 1, 1, False, False, False, "mean"),
        (3, 1, 2, 3, 2, True, True, True, "sum"),
        (2, 2, 1, 2, 4, True, False, True, "mean"),
        (4, 2, 2, 1, 1, False, True, False, "sum"),
        (2, 3, 1, 1, 1, True, True, True, "mean"),
        (2, 3, 2, 2, 3, False, False, True, "sum"),
        (1, 3, 3, 1, 2, True, False, False, "mean"),
        (2, 4, 1, 1, 1, True, True, True, "mean"),  # depth 4: a 2x2 bottleneck
    ]
] + [  # the levers, alone and together
    UNetConfig(base_filters=bf, depth=d, enc_convs=e, dec_convs=dc, decoder_width_mult=m,
               batch_norm=bn, block=block, upsample=up, attention_gates=gates, output=out)
    for bf, d, e, dc, m, bn, block, up, gates, out in [
        (3, 2, 2, 2, 1, True, "residual", "transpose", False, "both"),
        (2, 1, 1, 3, 2, False, "residual", "transpose", False, "both"),
        (4, 2, 2, 1, 1, True, "naf", "transpose", False, "both"),
        (3, 1, 1, 2, 2, False, "plain", "bilinear", False, "both"),
        (3, 2, 1, 1, 1, True, "plain", "transpose", True, "both"),
        (2, 2, 2, 2, 1, True, "plain", "transpose", False, "one"),
        (4, 3, 2, 2, 2, True, "residual", "bilinear", True, "one"),
        (4, 2, 1, 1, 1, False, "naf", "bilinear", True, "one"),
    ]
]


def variant_id(c: UNetConfig) -> str:
    return (f"bf{c.base_filters}-d{c.depth}-e{c.enc_convs}-dc{c.dec_convs}-m"
            f"{c.decoder_width_mult}-{'h' if c.depthwise_head else 'noh'}-"
            f"{'bn' if c.batch_norm else 'nobn'}-{'mc' if c.mixture_consistent else 'free'}-"
            f"{c.mixture}-{c.block}-{c.upsample}-{'ag' if c.attention_gates else 'noag'}-"
            f"out{c.output}")


@pytest.mark.parametrize("config", VARIANTS, ids=variant_id)
def test_output_shape_and_param_count(config: UNetConfig) -> None:
    torch.manual_seed(0)
    model = UNet(config)
    x = torch.rand(3, 1, 32, 32)
    for mode in (model.train, model.eval):
        mode()
        y = model(x)
        assert y.shape == (3, 2, 32, 32) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
    assert count_params(model) == params_of(config) == expected_params(config)


def test_reference_preset_has_the_published_parameter_count() -> None:
    config = PRESETS["reference"]
    assert params_of(config) == REFERENCE_PARAMS
    assert count_params(UNet(config)) == REFERENCE_PARAMS
    assert sum(p.numel() for p in UNet(config).parameters()) == REFERENCE_PARAMS
    assert expected_params(config) == REFERENCE_PARAMS


def test_presets_have_the_sizes_the_readme_gives() -> None:
    sizes = {name: params_of(cfg) for name, cfg in PRESETS.items()}
    assert sizes == {"reference": REFERENCE_PARAMS, "small": 262_822, "tiny": 806}
    assert sizes["small"] <= sizes["reference"] / 10  # the goal's size: a tenth at most


@pytest.mark.parametrize("mixture, scale", [("mean", 2.0), ("sum", 1.0)])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_mixture_consistent_outputs_add_up_to_the_mixture(mixture, scale, batch_norm) -> None:
    torch.manual_seed(1)
    config = UNetConfig(base_filters=3, depth=2, batch_norm=batch_norm, mixture=mixture)
    model = UNet(config)
    x = torch.rand(4, 1, 32, 32) * (1 if mixture == "mean" else 2)
    for mode in (model.train, model.eval):
        mode()
        y = model(x)
        torch.testing.assert_close(y.sum(dim=1, keepdim=True), scale * x, atol=1e-5, rtol=1e-5)
    # The same net without the projection does not satisfy it: the check above can fail.
    free = UNet(dataclasses.replace(config, mixture_consistent=False)).eval()
    gap = (free(x).sum(dim=1, keepdim=True) - scale * x).abs().max()
    assert gap > 1e-2


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"depth": -1}, "depth"),
        ({"depth": 0}, "depth"),
        ({"depth": 5}, "depth"),
        ({"base_filters": 0}, "base_filters"),
        ({"base_filters": 4.0}, "base_filters"),
        ({"enc_convs": "2"}, "enc_convs"),
        ({"depth": True}, "depth"),
        ({"dec_convs": 0}, "dec_convs"),
        ({"decoder_width_mult": 17}, "decoder_width_mult"),
        ({"batch_norm": 1}, "batch_norm"),
        ({"depthwise_head": "yes"}, "depthwise_head"),
        ({"mixture": "max"}, "mixture"),
        ({"mixture": "MEAN"}, "mixture"),
        ({"block": "dense"}, "block"),
        ({"upsample": "nearest"}, "upsample"),
        ({"attention_gates": "yes"}, "attention_gates"),
        ({"output": "two"}, "output"),
    ],
)
def test_bad_config_is_refused_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        UNetConfig(**overrides)
    with pytest.raises(ConfigError, match=rf"^{field} must"):
        preset("small", **overrides)


def test_from_dict_refuses_unknown_keys_and_round_trips() -> None:
    config = PRESETS["reference"]
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) \['base_filter'\]"):
        UNetConfig.from_dict({"base_filter": 8})
    with pytest.raises(ConfigError, match="depth"):
        UNetConfig.from_dict({**config.to_dict(), "depth": 7})


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_train_flops_grow_with_the_model() -> None:
    tiny = train_flops_per_sample(PRESETS["tiny"])
    narrow = train_flops_per_sample(preset("small", base_filters=8))
    small = train_flops_per_sample(PRESETS["small"])
    assert 0 < tiny < narrow < small
    # A 3x3 conv costs 2*9*in*out FLOPs per output pixel forward; the first one alone
    # (1 -> base_filters at 32x32) is a floor for the forward pass, and training costs more.
    first_conv_forward = 2 * 9 * 1 * PRESETS["small"].base_filters * 32 * 32
    assert small > 2 * first_conv_forward
    assert isinstance(small, int)
    # docs/benchmarks.md's figures (torch's FlopCounterMode, torch 2.13): 0.33 and 8.18 GFLOP.
    assert small == pytest.approx(333_987_840, rel=0.01)
    assert train_flops_per_sample(PRESETS["reference"]) == pytest.approx(8_181_792_768, rel=0.01)


# --- the levers: what each block does at initialization, and the derived output ------------


@pytest.mark.parametrize("mixture, scale", [("mean", 2.0), ("sum", 1.0)])
def test_one_output_derives_the_digit_from_the_mixture(mixture: str, scale: float) -> None:
    torch.manual_seed(2)
    config = UNetConfig(base_filters=3, depth=2, output="one", mixture=mixture,
                        mixture_consistent=False)  # moot: the sum is exact by construction
    model = UNet(config).eval()
    x = torch.rand(4, 1, 32, 32)
    y = model(x)
    assert model.head[0].out_channels == 1  # the network predicts the Fashion item only
    torch.testing.assert_close(y[:, :1], scale * x - y[:, 1:])
    assert y[:, 1:].std() > 0  # a real prediction, not a constant


def test_residual_block_starts_as_its_shortcut() -> None:
    from model.unet import ResidualBlock

    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8)
    same = ResidualBlock(4, 4, 2, batch_norm=True).eval()
    torch.testing.assert_close(same(x), torch.relu(x))  # the body's last BN starts at zero
    wider = ResidualBlock(4, 6, 2, batch_norm=True).eval()
    torch.testing.assert_close(wider(x), torch.relu(wider.shortcut(x)))
    nn_init = ResidualBlock(4, 4, 2, batch_norm=False).eval()  # no BN: no zero start
    assert not torch.allclose(nn_init(x), torch.relu(x))


def test_naf_block_starts_as_identity_and_learns_away_from_it() -> None:
    from model.unet import NAFBlock

    torch.manual_seed(4)
    block = NAFBlock(8)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(block(x), x)
    block(x).square().mean().backward()
    assert block.beta.grad.abs().sum() > 0 and block.gamma.grad.abs().sum() > 0


def test_attention_gate_scales_the_skip_by_weights_in_0_1() -> None:
    from model.unet import AttentionGate

    torch.manual_seed(5)
    gate = AttentionGate(skip_ch=6, gate_ch=4)
    skip, g = torch.rand(2, 6, 8, 8) + 0.1, torch.randn(2, 4, 8, 8)
    ratio = gate(skip, g) / skip
    assert (ratio > 0).all() and (ratio < 1).all()
    # one weight per pixel, shared by the skip's channels; it depends on the gate
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert not torch.allclose(gate(skip, g), gate(skip, -g))


def test_configs_from_before_the_levers_build_the_same_network() -> None:
    """A checkpoint's config saved before the lever fields existed builds today's default
    (plain blocks, transposed convs, no gates, both outputs), with the same weight names."""
    old = {k: v for k, v in PRESETS["small"].to_dict().items()
           if k not in ("block", "upsample", "attention_gates", "output", "bn_scale",
                        "bn_momentum")}
    config = UNetConfig.from_dict(old)
    assert config == PRESETS["small"]
    names = set(UNet(config).state_dict())
    assert not any(n.startswith("gates") for n in names)
    assert "head.0.weight" in names and "up.1.0.weight" in names
