"""Muon on the hidden conv filters, AdamW on the rest: one optimizer, so that one
LR schedule drives both and one state_dict checkpoints both.

Muon (Keller Jordan, 2024; the CIFAR-10 speedruns' airbench94_muon): SGD momentum with
Nesterov, whose update is orthogonalized before it is applied. A conv filter (out, in,
kh, kw), or a transposed conv's (in, out, kh, kw), is viewed as the matrix
(dim 0, the rest) and its update replaced by the nearest semi-orthogonal matrix,
approximately, by a few steps of the quintic Newton-Schulz iteration. As in airbench, no
weight decay on Muon's filters.

torch.optim.Muon (torch >= 2.9) takes 2-D parameters only, and a conv weight in
channels_last memory cannot be viewed as 2-D without a copy: hence this small optimizer,
which reshapes the update, not the parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The quintic iteration's coefficients, chosen to maximize the slope at 0 (Keller
# Jordan's Muon; torch.optim.Muon uses the same).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default


def split_for_muon(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden filters for Muon, everything else for AdamW).

    Muon takes every conv and transposed-conv weight that maps channels to channels:
    4-D, more than one input channel per filter. AdamW keeps the first conv (it reads
    the one-channel mixture), depthwise filters (one input channel each: no channel
    map to orthogonalize), the head (its last convs), norms and biases."""
    filters, rest = [], []
    for name, p in model.named_parameters():
        if p.ndim == 4 and p.shape[1] > 1 and not name.startswith("head."):
            filters.append(p)
        else:
            rest.append(p)
    return filters, rest


def newton_schulz(matrix: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximately U V^T of matrix = U S V^T, by the quintic Newton-Schulz iteration:
    X <- a X + (b A + c A A) X with A = X X^T, from X = matrix / ||matrix||_F. Its
    singular values land near 1 (in about [0.7, 1.2]), not exactly on it."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / (x.norm() + NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float,
                ns_steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The orthogonalized Nesterov update of one filter, in its own shape, scaled by
    sqrt(max(1, rows / cols)) of its matrix view (Keller Jordan's scale)."""
    momentum_buffer.lerp_(grad, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
    nesterov = grad.lerp(momentum_buffer, momentum)  # (1 - momentum) * g + momentum * buf
    matrix = nesterov.reshape(len(nesterov), -1)
    scale = math.sqrt(max(1.0, matrix.shape[0] / matrix.shape[1]))
    ortho = newton_schulz(matrix, ns_steps, dtype)
    return (ortho * scale).reshape(grad.shape).to(grad.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Group 0: Muon (lr, momentum, ns_steps); group 1: AdamW (adamw_lr, weight_decay)."""

    def __init__(self, muon_params: list[nn.Parameter], adamw_params: list[nn.Parameter], *,
                 lr: float, momentum: float, ns_steps: int, adamw_lr: float,
                 weight_decay: float, ns_dtype: torch.dtype = torch.float32) -> None:
        groups = [
            {"params": muon_params, "use_muon": True, "lr": lr, "momentum": momentum,
             "ns_steps": ns_steps},
            {"params": adamw_params, "use_muon": False, "lr": adamw_lr,
             "weight_decay": weight_decay},
        ]
        super().__init__(groups, {})
        self.ns_dtype = ns_dtype  # how Newton-Schulz multiplies: not state, the machine's

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self.muon_step(p, group)
                else:
                    self.adamw_step(p, group)

    def muon_step(self, p: nn.Parameter, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        update = muon_update(p.grad, state["momentum_buffer"], group["momentum"],
                             group["ns_steps"], self.ns_dtype)
        # (a product, not alpha=: torch.compile then takes the LR as an input, not a
        # constant that each step's new value would recompile)
        p.sub_(update * group["lr"])

    def adamw_step(self, p: nn.Parameter, group: dict) -> None:
        """torch.optim.AdamW's arithmetic (decoupled weight decay, bias correction)."""
        state = self.state[p]
        if not state:
            # The count as a tensor, as torch's optimizers keep it: a Python int would be
            # a constant to torch.compile, and every step a new graph (compile_step).
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        lr, (beta1, beta2), g = group["lr"], ADAM_BETAS, p.grad
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"].sqrt() / bias2.sqrt()).add_(ADAM_EPS)
        p.sub_(state["exp_avg"] / denom * (lr / bias1))
