"""l2l.py -- adversarial training with hand-designed and learned inner maximisers, in one file.

Papers this file follows:
  [L2L]      Jiang, Chen, Shi, Dai, Zhao. Learning to Defend by Learning to Attack. AISTATS 2021, arXiv 1811.01213
  [RNN]      Xiong, Hsieh. Improved Adversarial Training via Learned Optimizer. ECCV 2020, arXiv 2004.12227
  [Fast-BAT] Zhang, Zhang, Khanduri, Hong, Chang, Liu. Revisiting and Advancing Fast Adversarial Training
             Through the Lens of Bi-Level Optimization. ICML 2022, arXiv 2112.12376
and the baselines they compare against:
  [Madry]    Madry et al. Towards Deep Learning Models Resistant to Adversarial Attacks. ICLR 2018 (PGD-AT)
  [TRADES]   Zhang et al. Theoretically Principled Trade-off between Robustness and Accuracy. ICML 2019
  [Fast-AT]  Wong, Rice, Kolter. Fast is Better than Free. ICLR 2020 (FGSM from a random start)
  [GradAlign] Andriushchenko, Flammarion. Understanding and Improving Fast Adversarial Training. NeurIPS 2020

Run: python l2l.py --method rnn-adv --dataset cifar10 (each paper's recipe as flags, its constants Part I keywords).

Paper index: algorithm or equation -> the functions on its path -> the official file it was checked against line
by line (fast_adversarial = locuslab/fast_adversarial, Fast-BAT = OPTML-Group/Fast-BAT, TRADES = yaodongyu/TRADES,
L2L = YuyangShi/Learning-to-Defend-by-Learning-to-Attack, GradAlign = tml-epfl/understanding-fast-adv-training,
AA = fra31/auto-attack, RO = locuslab/robust_overfitting).
  [L2L] naive / grad / 2-step / k-step L2L: l2l_perturb, scaled_input_grad (L2L adv_loss.py); attacker networks
        (poster table): SlimAttacker, WideAttacker, GenBlock (attacker.py); alternating theta / phi updates:
        l2l_step, l2l_attacker_step (train_l2l_{1,2}_cifar10.py); "CW" column: cw_linf (cw.py,
        cw_attack_cifar10.py); "PGM" column and PGM-net start: pgd, start 'normal' (pgd_attack_cifar10.py).
  [RNN] Algorithm 1, this project's design (no official code exists; README): rnn_adv_step, rnn_trades_step,
        rnn_optimizer_step, rnn_attack, SignStepRNN, LSTMOptimizer; Table 1 AdvTrain+BLS: pgd_at_bls_step, pgd_bls
        (Armijo, as Nocedal & Wright).
  [Fast-BAT] eq. 9 closed form, eq. 13 IG with H_C, eq. 14 update: fast_bat_step, fast_bat_backward, box_bounds
        (Fast-BAT trainer.py); step a, schedule, data, selection: fast_bat_step_size, schedule_at, augment, validate
        (train.py, datasets.py).
  [Madry] eq. 2.1, PGD with random start: pgd_at_step, pgd (RO train_cifar.py for the schedule).
  [TRADES] Algorithm 1: trades_step, trades_attack, trades_loss (trades.py, train_trades_*.py).
  [Fast-AT] Algorithm 3, FGSM from U(-eps, eps): fast_at_step, fgsm (fast_adversarial CIFAR10/train_fgsm.py).
  [GradAlign] FGSM + gamma (1 - cos): fast_at_ga_step, gradalign_penalty (Fast-BAT trainer.py, GradAlign train.py).
  [APGD, AA] Croce & Hein: apgd_ce, apgd_targeted, apgd, dlr_loss (autopgd_base.py); FAB-T, Square, the standard
        suite: fab_targeted, square_linf, autoattack (fab_pt.py, fab_projections.py, square.py, autoattack.py).
  models: SmallCNN (TRADES small_cnn.py), MNISTNet (fast_adversarial mnist_net.py), PreActResNet18
        (preact_resnet.py, Fast-BAT model_zoo.py, RO preactresnet.py), WideResNet (TRADES wideresnet.py).
Differences kept on purpose are listed in README ("Deliberate differences from the official code").

Conventions: images are float tensors in [0,1], N x C x H x W; a model's first layer normalises them where the
official code does (Normalize), so eps, steps and clamps are in pixel space and outside tools can attack a
checkpoint. An attack returns x_adv in C = {||x_adv - x||_inf <= eps} n [0,1]. Evaluation runs in eval mode.
"""

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import resource
import shutil
import sys
import time
import uuid
from collections import namedtuple
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

# ================================================================================================
# PART I: THE ALGORITHMS. Models, hand-designed attacks, learned attackers and optimisers, and one
# training step per method. Everything here takes explicit arguments and needs only torch, torch.nn as
# nn, torch.nn.functional as F and math: a function copies out with the definitions it calls (README,
# "Copy an algorithm"). Nothing here reads a flag or talks to other processes. Part II, the harness, follows.


# Models. Inputs in [0,1]; per-channel normalisation (or the identity) is the first layer of every network.


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer, so that attacks and eps live in pixel space. Mean 0 and std 1 leave
    x exactly as it is (the official TRADES and L2L networks see raw [0,1] inputs)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """The 4-conv MNIST network of TRADES (small_cnn.py) and Madry et al.: conv32-conv32-pool-
    conv64-conv64-pool-fc200-dropout0.5-fc200-fc. Initialised as small_cnn.py: convolutions Kaiming-normal
    with zero biases, the last layer all zero, the two hidden linear layers PyTorch's default."""

    def __init__(self, in_ch=1, classes=10, hw=28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2))
        side = ((hw - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 200), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, classes))
        for m in self.modules():  # TRADES' initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

    def forward(self, x):
        return self.classifier(self.features(x))


class MNISTNet(nn.Module):
    """The MNIST network of Wong et al.'s Fast-AT code (fast_adversarial MNIST/mnist_net.py): conv16 4x4/2 -
    conv32 4x4/2 - fc100 - fc, ReLU between, PyTorch's default initialisation."""

    def __init__(self, in_ch=1, classes=10, hw=28):
        super().__init__()
        side = hw // 4
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(32 * side * side, 100), nn.ReLU(), nn.Linear(100, classes))

    def forward(self, x):
        return self.layers(x)


class VGG16(nn.Module):
    """VGG-16 with batch norm (the CIFAR variant: 13 convs, one linear layer). Max-pools use ceil
    mode so 28x28 MNIST inputs survive the five poolings as 32x32 inputs do."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, in_ch=3, classes=10):
        super().__init__()
        layers, c = [], in_ch
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016). shortcut="input": the 1x1 projection shortcut takes the block's
    raw input x, as fast_adversarial (CIFAR10/preact_resnet.py) and Fast-BAT (model_zoo.py) wire it;
    shortcut="activation": it takes relu(bn1(x)), as Rice et al.'s robust_overfitting (preactresnet.py) and
    kuangliu's pytorch-cifar do. The two are different networks with the same parameters."""

    def __init__(self, c_in, c_out, stride, shortcut="input"):
        super().__init__()
        self.shortcut_input = shortcut
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(x if self.shortcut_input == "input" else out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class PreActResNet18(nn.Module):
    """PreActResNet-18: 3x3 stem, [2,2,2,2] blocks of widths w-2w-4w-8w (the papers' w = 64; w = 16 has 1/16 of the
    FLOPs, for CPU-sized studies), BN-ReLU, pool; shortcut: PreActBlock's."""

    def __init__(self, in_ch=3, classes=10, shortcut="input", width=64):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        blocks, c = [], width
        for stage, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            blocks += [PreActBlock(c, stage, stride, shortcut), PreActBlock(stage, stage, 1, shortcut)]
            c = stage
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    """WideResNet basic block (Zagoruyko & Komodakis; TRADES' wideresnet.py, which L2L uses, dropout 0). Unlike
    PreActBlock, the projection shortcut takes relu(bn1(x)), as wideresnet.py wires it."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class WideResNet(nn.Module):
    """WRN-depth-width: (depth - 4) / 6 blocks per stage, widths 16k, 32k, 64k. WRN-34-10 by default."""

    def __init__(self, in_ch=3, classes=10, depth=34, width=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        blocks, c = [], widths[0]
        for stage, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(c, stage, stride if i == 0 else 1))
                c = stage
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ================================================================================================
# Hand-designed attacks: pure functions in pixel space. Each returns x_adv in C = {||x_adv - x||_inf
# <= eps} n [0,1]. They take the model in whatever mode the caller set (trainers choose the BN mode,
# evaluation uses eval mode) and compute gradients w.r.t. the input only: parameter .grad untouched.


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Pi_C: clamp to the eps-ball around x, then to [0,1]. Exact for l_inf, as x itself is in [0,1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def start_point(x: torch.Tensor, eps: float, kind: str = "uniform", clamp: bool = True) -> torch.Tensor:
    """The first iterate of an attack (--attack-start):
      'uniform': x + U(-eps, eps), projected onto C (Madry et al.; Wong et al.); with clamp False left unprojected
                 (outside [0,1] near the image's edges, where fast_adversarial's MNIST script takes its FGSM gradient);
      'normal':  x + 0.001 N(0, I), not projected: trades.py and L2L's adv_loss.py take their first gradient
                 there, and every later iterate is projected."""
    if kind == "normal":
        return x + 0.001 * torch.randn_like(x)
    x0 = x + torch.empty_like(x).uniform_(-eps, eps)
    return project(x0, x, eps) if clamp else x0


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example Carlini-Wagner margin max_{j != y} z_j - z_y (>0 iff misclassified). Maximising it
    with PGD under l_inf is what TRADES- and Fast-BAT-era tables call "CW" (the 'cw' attack here); the
    optimisation-based CW-l_inf of the L2L tables is cw_linf below."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return other.amax(1) - z_y


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example loss an attack ascends: 'ce' cross-entropy or 'cw' margin."""
    return F.cross_entropy(logits, y, reduction="none") if loss == "ce" else cw_margin(logits, y)


def input_grad_and_logits(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str = "ce"):
    """(grad_x of the summed per-example loss, the logits of that forward pass). Every example gets its own,
    unscaled gradient. Only the input's gradient is computed: autograd runs no weight-gradient kernels for it
    and leaves every .grad alone."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        (grad,) = torch.autograd.grad(attack_loss(logits, y, loss).sum(), x_adv)
    return grad, logits.detach()


def input_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """grad_x of the summed per-example loss (see input_grad_and_logits)."""
    return input_grad_and_logits(model, x_adv, y, loss)[0]


def fgsm(model, x, y, eps, step_size=None, rand_init=False, clamp_start=True):
    """FGSM (Goodfellow et al. 2015): x' = Pi_C(x0 + a sign(grad_x L(x0))), x0 = x or a uniform random
    start (Wong et al. 2020), clamped to [0,1] unless clamp_start is False. a defaults to eps."""
    step_size = eps if step_size is None else step_size
    x0 = start_point(x, eps, "uniform", clamp_start) if rand_init else x
    return project(x0 + step_size * input_grad(model, x0, y).sign(), x, eps).detach()


def pgd_path(model, x, y, eps, step_size, steps, loss="ce", start="uniform"):
    """One run of l_inf PGD (Madry et al. 2018), `loss` 'ce' or 'cw':
        x_0 = start_point(x, eps, start);   x_{t+1} = Pi_C(x_t + a sign(grad_x L(x_t))),   t = 0..T-1.
    Yields each x_t (t < T) with the logits of the forward pass that took its gradient, then x_T with None."""
    x_adv = start_point(x, eps, start)
    for _ in range(steps):
        grad, logits = input_grad_and_logits(model, x_adv, y, loss)
        yield x_adv, logits
        x_adv = project(x_adv + step_size * grad.sign(), x, eps)
    yield project(x_adv, x, eps), None  # a no-op after a step; projects an unprojected start when steps = 0


def pgd(model, x, y, eps, step_size, steps, restarts=1, loss="ce", start="uniform", keep_fooling=False):
    """l_inf PGD (pgd_path). Training uses the final iterate of one run. With restarts > 1 each example keeps its
    worst restart: misclassified beats correct, then the larger loss wins.
    keep_fooling (evaluation): an example keeps the first iterate of any step or restart that the model
    misclassifies (read from the logits each step computes anyway, and from one pass at each final iterate).
    Never weaker than the final iterate; fast_adversarial's attack_pgd stops an example at its first misclassified
    iterate within a restart but then keeps the restart of highest loss, which can drop it."""
    view = (-1,) + (1,) * (x.dim() - 1)
    best = x.detach().clone()
    best_wrong = torch.zeros_like(y, dtype=torch.bool)
    best_loss = torch.full(y.shape, float("-inf"), device=x.device)
    for _ in range(restarts):
        for x_adv, logits in pgd_path(model, x, y, eps, step_size, steps, loss, start):
            if keep_fooling and logits is not None:
                fooled = (logits.argmax(1) != y) & ~best_wrong
                best = torch.where(fooled.view(view), project(x_adv, x, eps), best)
                best_wrong = best_wrong | fooled
        if restarts == 1 and not keep_fooling:
            return x_adv.detach()
        with torch.no_grad():  # the restart bookkeeping
            logits = model(x_adv)
            wrong, value = logits.argmax(1) != y, attack_loss(logits, y, loss)
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_loss))
            best = torch.where(better.view(view), x_adv, best)
            best_wrong, best_loss = best_wrong | wrong, torch.where(better, value, best_loss)
    return best.detach()


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target=None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 6 and the targeted form of Sec. 4), per example,
    with z sorted decreasingly as z_pi1 >= z_pi2 >= ...:
      untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
      targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)
    Shift- and scale-invariant in the logits, so logit rescaling cannot hide the attack's progress."""
    z = logits.sort(1, descending=True)[0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:  # cw_margin is -(z_y - max_{i != y} z_i)
        return cw_margin(logits, y) / (z[:, 0] - z[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z[:, 0] - (z[:, 2] + z[:, 3]) / 2 + 1e-12)


def apgd_checkpoints(n_iter: int) -> list:
    """The iterations where APGD may halve its step (Croce & Hein 2020, Sec. 3.2): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in whole iterations (intervals 0.22 N, shrinking by
    0.03 N down to 0.06 N), which avoids rounding drift: N = 100 gives 22, 41, 57, 70, 80, 87, 93, 99."""
    step, shrink, least = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    points, w = [], step
    while w <= n_iter:
        points.append(w)
        step = max(step - shrink, least)
        w += step
    return points


def apgd(model, x, y, eps, n_iter=100, loss="ce", target=None, rho=0.75):
    """Auto-PGD under l_inf (Croce & Hein, ICML 2020, Algorithm 1), per example, as auto-attack's
    autopgd_base.py (attack_single_run) runs it:
      x0 = clamp(x + eps t / ||t||_inf, 0, 1), t ~ U(-1, 1)^d; eta = 2 eps;
      z = P(x_k + eta sign(grad f(x_k)));  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})), alpha = 1 at the
      first step and 0.75 after;
      at each checkpoint w_j (apgd_checkpoints) eta is halved, and the example restarts from its best point with
      that point's gradient, when (1) the loss rose in at most rho (w_j - w_{j-1}) of the window's steps, each
      step compared with the one before (the first window's first step with 0, as autopgd_base.py compares it
      with a loss row not yet written), or (2) eta was not halved at w_{j-1} and the best loss has not risen
      since; condition (2) is off at w_1 (the code's reduced_last_check starts at ones). An example that restarts
      keeps its last iterate as the previous one, so its first step after the restart has the momentum of
      x_best - x_{k-1}.
    `loss`: 'ce' or 'dlr' (with `target`: the targeted DLR of APGD-T). Returns, per example, a misclassified
    iterate when one was found, else the highest-loss one."""
    def f_and_grad(z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z)
            value = F.cross_entropy(logits, y, reduction="none") if loss == "ce" else dlr_loss(logits, y, target)
            (g,) = torch.autograd.grad(value.sum(), z)
        return value.detach(), g, logits.detach().argmax(1) != y

    view = (-1,) + (1,) * (x.dim() - 1)
    t = torch.empty_like(x).uniform_(-1, 1)
    x_k = (x + eps * t / (t.flatten(1).abs().amax(1).view(view) + 1e-12)).clamp(0, 1)
    f_k, g, wrong = f_and_grad(x_k)
    x_best, f_best, g_best = x_k.clone(), f_k.clone(), g.clone()
    x_fool, found = x_k.clone(), wrong.clone()  # the first misclassified iterate of each example
    eta = torch.full_like(f_k, 2 * eps)
    checkpoints = set(apgd_checkpoints(n_iter))
    last_w, f_best_at_last, halved_at_last = 0, f_best.clone(), torch.ones_like(found)
    window = [torch.zeros_like(f_k)]  # losses of the iterates since the last checkpoint, after the one before it
    x_prev = x_k.clone()
    for k in range(n_iter):
        z = project(x_k + eta.view(view) * g.sign(), x, eps)
        alpha = 1.0 if k == 0 else 0.75  # the momentum weight of the paper's update
        x_new = project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, eps)
        x_prev, x_k = x_k, x_new
        f_k, g, wrong = f_and_grad(x_k)
        x_fool = torch.where((wrong & ~found).view(view), x_k, x_fool)
        found |= wrong
        window.append(f_k)
        better = f_k > f_best
        x_best = torch.where(better.view(view), x_k, x_best)
        g_best = torch.where(better.view(view), g, g_best)
        f_best = torch.where(better, f_k, f_best)
        if k + 1 in checkpoints:
            increases = sum((b > a_).float() for a_, b in zip(window[:-1], window[1:]))
            cond1 = increases <= rho * (k + 1 - last_w)
            cond2 = ~halved_at_last & (f_best_at_last >= f_best)
            halve = cond1 | cond2
            eta = torch.where(halve, eta / 2, eta)
            x_k = torch.where(halve.view(view), x_best, x_k)
            g = torch.where(halve.view(view), g_best, g)
            last_w, f_best_at_last, halved_at_last = k + 1, f_best.clone(), halve
            window = window[-1:]
    return torch.where(found.view(view), x_fool, x_best).detach()


def apgd_ce(model, x, y, eps, n_iter=100):
    """APGD-CE as AutoAttack runs it (autopgd_base.py, perturb): only on the examples the model classifies
    correctly; the others are adversarial already and are returned as they are."""
    with torch.no_grad():
        todo = (model(x).argmax(1) == y).nonzero().squeeze(1)
    x_adv = x.detach().clone()
    if todo.numel():
        x_adv[todo] = apgd(model, x[todo], y[todo], eps, n_iter, "ce")
    return x_adv


def apgd_targeted(model, x, y, eps, n_iter=100, n_targets=9):
    """APGD-T (Croce & Hein 2020) as autopgd_base.py runs it: APGD on the targeted DLR loss, once for each of the
    `n_targets` classes ranked highest by the clean logits (the true class left out), each time only on the
    examples not misclassified yet (clean or by an earlier target); an example keeps the iterate that fooled the
    model, else the last target's result."""
    with torch.no_grad():
        logits = model(x)
    order = logits.sort(1, descending=True)[1]
    targets = order[order != y[:, None]].view(len(y), -1)  # candidate classes, most likely first
    x_adv, fooled = x.detach().clone(), logits.argmax(1) != y
    for i in range(min(n_targets, targets.shape[1])):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        cand = apgd(model, x[todo], y[todo], eps, n_iter, "dlr", targets[todo, i])
        x_adv[todo] = cand
        with torch.no_grad():
            fooled[todo] = model(cand).argmax(1) != y[todo]
    return x_adv


def fab_linf_projection(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FAB's projection (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive
    boundary attack", Sec. 3.1; auto-attack fab_projections.py, projection_linf), per row of the N x D inputs:
    the smallest l_inf step d with <w, t + d> = b and t + d in the box [0,1]^D, t = points[i].
    Each coordinate moves towards the hyperplane by min(r, room_i), room_i being its distance to the box face it moves
    to; the radius r is found by bisection over the sorted rooms. A row whose hyperplane the box cannot reach gets the
    full step to the box corner nearest to it."""
    t, w, b = points, w.clone(), b.clone()
    side = 2 * ((w * t).sum(1) - b >= 0) - 1  # orient every hyperplane so that the step has to lower <w, z>
    w, b = w * side.unsqueeze(1), b * side
    up = (w < 0).float()  # coordinates that move up, towards 1 (the others move down, towards 0)
    d = (up - t) * (w != 0).float()  # the full step to the box corner
    room = up - t * (2 * up - 1)  # how far each coordinate can move: 1 - t going up, t going down
    order = torch.argsort(room, dim=1)  # rooms increasing
    need = b - (w * t).sum(1)  # the change of <w, z> the step must make
    at_corner = (w * d).sum(1)  # the change the full corner step makes
    desc = order.flip((1,))  # rooms decreasing
    w_desc = w.gather(1, desc)
    # With radius r = room of the k-th largest, the k+1 roomiest coordinates move by r and the rest go to the corner:
    # the change is change_at[k] - clipped_weight[k] r.
    clipped_weight = torch.cumsum(w_desc.abs(), dim=1)
    change_at = torch.cumsum(-w_desc * d.gather(1, desc), dim=1) + at_corner.unsqueeze(1)
    all_clipped = change_at[:, -1] - clipped_weight[:, -1] * room.gather(1, order[:, 0:1]).squeeze(1)
    below_least_room = need - all_clipped > 0  # reached with every coordinate moving less than its room
    bisect = (need - at_corner > 0) & ~below_least_room  # reachable, with some coordinates at their box face
    # every row is bisected and the rows' cases are chosen by torch.where, not by indexing: no host synchronisation,
    # and per row the same arithmetic as on the selected rows alone
    lo = torch.zeros_like(need)
    hi = torch.full_like(lo, w.shape[1] - 1)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lo + hi) / 2)
        k = mid.long().unsqueeze(1)
        kth = order.gather(1, order.size(1) - 1 - k)  # the coordinate with the k-th largest room
        change = (change_at.gather(1, k) - clipped_weight.gather(1, k) * room.gather(1, kth)).squeeze(1)
        further = need - change > 0
        lo = torch.where(further, mid, lo)
        hi = torch.where(further, hi, mid)
    lo = lo.long().unsqueeze(1)
    r = torch.clamp_min((need - change_at[:, -1]) / (-clipped_weight[:, -1]), min=0).unsqueeze(-1)
    d = torch.where(below_least_room.unsqueeze(1), (2 * up - 1) * r, d)
    r = torch.clamp_min((need.unsqueeze(1) - change_at.gather(1, lo)) / (-clipped_weight.gather(1, lo)), min=0)
    d = torch.where(bisect.unsqueeze(1), torch.min(r, d) * up + torch.max(-r, d) * (1 - up), d)
    return d * (w != 0).float()


def fab_targeted_run(model, x, y, target, n_iter=100, alpha_max=0.1, eta=1.05, beta=0.9):
    """One run of targeted FAB under l_inf from the clean point (Croce & Hein 2020, Algorithm 1; auto-attack
    fab_base.py, attack_single_run with is_targeted and no random start; the gradient of fab_pt.py's
    get_diff_logits_grads_batch_targeted). Every example is assumed correctly classified. Per iteration:
      linearise f(z) = z_target - z_y at x_k: the hyperplane {z : f(x_k) + <grad f(x_k), z - x_k> = 0};
      d_k, d_0 = the minimal l_inf steps from x_k and from x onto it, in [0,1]^D (fab_linf_projection);
      alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max);
      x_{k+1} = clip_[0,1]((1 - alpha)(x_k + eta d_k) + alpha (x + eta d_0))   (eta: overshoot);
      if x_{k+1} is misclassified: keep it when it is the closest to x so far, then x_{k+1} = x + beta (x_{k+1} - x).
    Returns, per example, the closest misclassified point found (of any l_inf size), else x."""
    n, view = x.shape[0], (-1,) + (1,) * (x.dim() - 1)
    rows = torch.arange(n, device=x.device)
    x_flat = x.reshape(n, -1)
    x_k = x.clone()
    best, best_dist = x.clone(), torch.full((n,), 1e10, device=x.device)
    for _ in range(n_iter):
        z = x_k.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z)
            f = -(logits[rows, y] - logits[rows, target])
            (g,) = torch.autograd.grad(f.sum(), z)
        with torch.no_grad():
            f, w = f.detach(), g.reshape(n, -1)
            b = -f + (g * x_k).reshape(n, -1).sum(-1)  # the hyperplane <w, z> = b
            d = fab_linf_projection(torch.cat((x_k.reshape(n, -1), x_flat), 0), torch.cat((w, w), 0),
                                    torch.cat((b, b), 0))
            d_k, d_0 = d[:n].reshape(x.shape), d[n:].reshape(x.shape)
            size = torch.clamp_min(d.abs().max(dim=1, keepdim=True)[0], 1e-8).view(-1, *view[1:])
            alpha = (size[:n] / (size[:n] + size[n:])).clamp(min=0).clamp(max=alpha_max)
            x_k = ((x_k + eta * d_k) * (1 - alpha) + (x + d_0 * eta) * alpha).clamp(0.0, 1.0)
            fooled = model(x_k).argmax(1) != y
            distance = (x_k - x).reshape(n, -1).abs().max(dim=1)[0]
            closer = fooled & (distance < best_dist)
            best = torch.where(closer.view(view), x_k, best)
            best_dist = torch.where(closer, distance, best_dist)
            x_k = torch.where(fooled.view(view), x + (x_k - x) * beta, x_k)  # step back towards x
    return torch.where((best_dist < 1e10).view(view), best, x).detach()


def fab_targeted(model, x, y, eps, n_iter=100, n_targets=9, alpha_max=0.1, eta=1.05, beta=0.9):
    """FAB-T under l_inf as AutoAttack's standard version runs it (auto-attack fab_base.py, perturb with targeted=True
    and n_restarts=1; alpha_max 0.1, eta 1.05, beta 0.9 are its defaults): for the 2nd, 3rd, ... (n_targets + 1)-th
    most likely class of the clean logits in turn, fab_targeted_run on the examples still robust (correct, and not
    yet fooled within eps). A result counts when it is misclassified and within eps; FAB minimises the distance
    and does not project, so a farther one is dropped. Returns x_adv in C: the fooling point, else x."""
    with torch.no_grad():
        logits = model(x)
    robust = logits.argmax(1) == y
    by_likelihood = logits.sort(dim=-1)[1]  # classes in increasing logit order
    x_adv = x.detach().clone()
    for rank in range(2, n_targets + 2):
        todo = robust.nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        cand = fab_targeted_run(model, x[todo], y[todo], by_likelihood[todo, -rank], n_iter, alpha_max, eta, beta)
        with torch.no_grad():
            wrong = model(cand).argmax(1) != y[todo]
        fooled = wrong & ((cand - x[todo]).reshape(len(todo), -1).abs().max(1)[0] <= eps)
        x_adv[todo[fooled]] = cand[fooled]
        robust[todo[fooled]] = False
    return x_adv


def square_p(it: int, p_init: float = 0.8) -> float:
    """Square Attack's schedule of p, the fraction of the image a square covers (square.py, p_selection with
    AutoAttack's resc_schedule=False): p_init halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000."""
    return p_init / 2 ** sum(it > bound for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))


def square_linf(model, x, y, eps, n_queries=5000, p_init=0.8, generator=None):
    """Square Attack under l_inf (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020, Algorithm 1 with the l_inf
    square distribution of Sec. 3.1), as AutoAttack's standard version runs it (auto-attack square.py,
    attack_single_run and perturb: margin loss, one restart, 5000 queries, p_init 0.8). Score-based: only the
    model's logits are used, so masked gradients do not stop it. On the correctly classified examples:
      x_best = clip(x + eps s), s in {-1, 1} per example, channel and image column (vertical stripes);
      at iteration i, side h_i = max(round(sqrt(p_i D / c)), 1) with p_i = square_p(i); one window position and one
      sign per channel, drawn once for the whole batch; x_new = x_best with that window set to x +- eps (clipped to
      [0,1]); x_best = x_new where the margin z_y - max_{j != y} z_j falls or turns <= 0;
    until every example is misclassified or the queries are spent. The random numbers come from `generator` (the
    default CPU generator when None), as square.py draws them. Returns x_adv in C: the fooling point, else x."""
    rand = lambda shape: torch.rand(shape, generator=generator, device="cpu")  # on the host, as square.py draws
    sign = lambda shape: torch.sign(2 * rand(shape) - 1).to(x.device)

    def margin(z, labels):  # z_y - max_{j != y} z_j: cw_margin's negative (a subtraction, exactly)
        with torch.no_grad():
            return -cw_margin(model(z), labels)

    x_adv = x.detach().clone()
    with torch.no_grad():
        todo = (model(x).argmax(1) == y).nonzero().squeeze(1)
    if todo.numel() == 0:
        return x_adv
    xs, ys = x[todo], y[todo]
    c, h, w = xs.shape[1:]
    view = (-1,) + (1,) * (xs.dim() - 1)
    x_best = torch.clamp(xs + eps * sign([xs.shape[0], c, 1, w]), 0.0, 1.0)
    margin_min = margin(x_best, ys)
    loss_min = margin_min.clone()
    if not (margin_min < 0.0).all():
        for i in range(n_queries):
            active = (margin_min > 0.0).nonzero().squeeze(1)
            if active.numel() == 0:  # only margins of exactly 0 are left: nothing to improve
                break
            x_c, best_c, y_c = xs[active], x_best[active], ys[active]
            side = min(max(int(round(math.sqrt(square_p(i, p_init) * (c * h * w) / c))), 1), min(h, w))
            top = int((h - side) * rand([1]))
            left = int((w - side) * rand([1]))
            delta = torch.zeros([c, h, w], device=x.device)
            delta[:, top:top + side, left:left + side] = 2.0 * eps * sign([c, 1, 1])
            x_new = project(best_c + delta, x_c, eps)
            m = margin(x_new, y_c)
            lower = m < loss_min[active]
            loss_min[active] = torch.where(lower, m, loss_min[active])
            take = lower | (m <= 0.0)
            margin_min[active] = torch.where(take, m, margin_min[active])
            x_best[active] = torch.where(take.view(view), x_new, best_c)  # all fooled: the next `active` is empty
    with torch.no_grad():
        fooled = model(x_best).argmax(1) != ys
    x_adv[todo[fooled]] = x_best[fooled]
    return x_adv


# AutoAttack's standard version under l_inf, in its order (autoattack.py, set_version('standard')).
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def autoattack(model, x, y, eps, attacks=AUTOATTACK_STANDARD, batch_size=250, seed=0, n_iter=100, n_targets=9,
               fab_iter=100, fab_targets=9, n_queries=5000, on_batch=None):
    """AutoAttack (Croce & Hein, ICML 2020), standard version, l_inf, as auto-attack autoattack.py
    (run_standard_evaluation) runs it: the clean predictions, then each attack in `attacks` in turn on the examples
    still robust, in chunks of `batch_size`, the random generators seeded with `seed` before every chunk (as each
    attack's perturb seeds them); an example fooled by one attack is not attacked again and keeps that attack's point.
    Defaults are the standard version's: APGD-CE (100 iterations, 1 run), APGD-T (9 targets x 100), FAB-T
    (9 targets x 100), Square (5000 queries, p_init 0.8). Note that it reseeds torch's global generators.
    on_batch(name, n), when given, is called before every chunk, n the examples the attack starts on (progress).
    Returns (x_adv, robust): x_adv in C; robust[name] the examples still robust after that attack ('clean' first)."""
    run = {"apgd-ce": lambda xb, yb: apgd_ce(model, xb, yb, eps, n_iter),
           "apgd-t": lambda xb, yb: apgd_targeted(model, xb, yb, eps, n_iter, n_targets),
           "fab-t": lambda xb, yb: fab_targeted(model, xb, yb, eps, fab_iter, fab_targets),
           "square": lambda xb, yb: square_linf(model, xb, yb, eps, n_queries)}
    x_adv = x.detach().clone()
    with torch.no_grad():
        still = torch.cat([model(xb).argmax(1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    robust = {"clean": still.clone()}
    for name in attacks:
        if not still.any():  # nothing left to attack (autoattack.py stops here)
            robust[name] = still.clone()
            continue
        todo = still.nonzero().squeeze(1)
        for chunk in todo.split(batch_size):
            if on_batch is not None:
                on_batch(name, todo.numel())
            torch.manual_seed(seed)
            cand = run[name](x[chunk], y[chunk])
            with torch.no_grad():
                fooled = model(cand).argmax(1) != y[chunk]
            x_adv[chunk[fooled]] = cand[fooled]
            still[chunk[fooled]] = False
        robust[name] = still.clone()
    return x_adv, robust


def inner_loss(model, x_adv, y, logp_clean=None) -> torch.Tensor:
    """Per-example inner loss: CE (PGD-AT, RNN-Adv), or KL(f(x) || f(x')) when the clean log-probabilities are
    given (TRADES, RNN-TRADES)."""
    logits = model(x_adv)
    if logp_clean is None:
        return F.cross_entropy(logits, y, reduction="none")
    return F.kl_div(F.log_softmax(logits, 1), logp_clean, reduction="none", log_target=True).sum(1)


def inner_grad(model, x_adv, y, logp_clean=None) -> torch.Tensor:
    """grad_x' of the summed inner loss at x' (each example its own gradient); no graph is kept."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(inner_loss(model, x_adv, y, logp_clean).sum(), x_adv)
    return g


def trades_attack(model, x, eps, step_size, steps, start="normal"):
    """The TRADES inner maximisation (Zhang et al. 2019, Algorithm 1, and trades.py): from x + 0.001 N(0, I)
    (unprojected, as trades.py; --attack-start), sign steps on sum KL(f(x) || f(x')), projected onto C. The
    clean distribution is a constant."""
    with torch.no_grad():
        logp_clean = F.log_softmax(model(x), dim=1)
    x_adv = start_point(x, eps, start)
    for _ in range(steps):
        x_adv = project(x_adv + step_size * inner_grad(model, x_adv, None, logp_clean).sign(), x, eps)
    return project(x_adv, x, eps).detach()


def pgd_bls(model, x, y, eps, steps, init_step, shrink=0.5, c=1e-4, tries=8, start="uniform"):
    """PGD with a backtracking line search per example and step (AdvTrain+BLS of Xiong & Hsieh, Table 1; the
    rule is the projected Armijo condition of Nocedal & Wright, a reconstruction: no official code exists).
    At x_t with g = grad_x L(x_t) and direction sign(g): try s = init_step, s * shrink, ... (`tries` sizes);
    accept the first x_s = Pi_C(x_t + s sign(g)) with L(x_s) >= L(x_t) + c <g, x_s - x_t>. An example with no
    acceptable size stays at x_t, so no accepted step ever lowers its loss. Start as PGD (--attack-start)."""
    x_adv = project(start_point(x, eps, start), x, eps)
    for _ in range(steps):
        g, logits = input_grad_and_logits(model, x_adv, y)
        loss = F.cross_entropy(logits, y, reduction="none")
        s = torch.full_like(loss, init_step)
        new, done = x_adv.clone(), torch.zeros_like(y, dtype=torch.bool)
        for _ in range(tries):
            cand = project(x_adv + s[:, None, None, None] * g.sign(), x, eps)
            with torch.no_grad():
                cand_loss = F.cross_entropy(model(cand), y, reduction="none")
            ok = ~done & (cand_loss >= loss + c * (g * (cand - x_adv)).flatten(1).sum(1))
            new = torch.where(ok[:, None, None, None], cand, new)
            done, s = done | ok, s * shrink
        x_adv = new
    return x_adv.detach()


class ModelMode:
    """Context manager: put a model in train or eval mode and restore every module's previous mode on exit.
    With dropout=False (attack_mode) dropout layers stay in eval mode whatever `mode` says."""

    def __init__(self, model: nn.Module, mode: str, dropout: bool = True):
        self.model, self.mode, self.dropout = model, mode, dropout

    def __enter__(self):
        self.was_training = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.mode == "train")
        for m in self.model.modules():
            if not self.dropout and isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        return self.model

    def __exit__(self, *exc):
        for m, training in self.was_training:
            m.training = training


def attack_mode(model: nn.Module, bn: str) -> ModelMode:
    """The classifier's mode while a training-time attack runs: BatchNorm in `bn` mode (--attack-bn: batch
    statistics and running-statistics updates in 'train', as fast_adversarial and Fast-BAT; running statistics in
    'eval', as TRADES), dropout always off. BN mode and dropout are different things: an attack that sampled a
    dropout mask at every forward pass would ascend a different network at each step (and a line search would
    compare losses of different networks)."""
    return ModelMode(model, bn, dropout=False)


def cw_linf(model, x, y, eps, lr=5e-3, max_iterations=50, initial_const=1e-5, largest_const=1e2, const_factor=10.0,
            decrease_factor=0.9, min_tau=1 / 256, abort_early=True):
    """The Carlini-Wagner l_inf attack (Carlini & Wagner 2017, Sec. V-C) as the official L2L cw.py runs it for the
    "CW" column of the L2L tables, every example independently (batched here; each example keeps its own state):
      only correctly classified examples are attacked; tau = 1, c = initial_const, start s = x;
      repeat (while tau > min_tau):
        minimise  c * relu(z_y - max_{j != y} z_j) + sum_i relu(|x'_i - x_i| - tau)  over w, x' = tanh(w + w_s)/2 + 1/2,
        w_s = artanh(0.9999 (2 s - 1)), w from 0 with Adam (lr 5e-3), up to max_iterations steps per c, c x10 while
        c < largest_const (Adam and w carry over when c grows; c carries over to the next tau);
        a step whose image (read before the update) is misclassified with ||x' - x||_inf < eps ends the attack:
        success; one misclassified with loss < 1e-4 c (abort_early) ends the descent: tau = 0.9 min(tau,
        ||x' - x||_inf), s = x', and the descent restarts from w = 0 with a fresh Adam;
      a descent that exhausts c, or tau falling to min_tau, is a failure: the example keeps its clean image.
    Returns x_adv with ||x_adv - x||_inf < eps (strictly) and x_adv in [0,1]."""
    n, view = x.shape[0], (-1,) + (1,) * (x.dim() - 1)
    with torch.no_grad():
        active = model(x).argmax(1) == y
    x_adv = x.detach().clone()
    tau = torch.ones(n, dtype=torch.float64, device=x.device)
    const = torch.full((n,), initial_const, dtype=torch.float64, device=x.device)
    w_start = torch.atanh(0.9999 * (2 * x - 1))
    w, adam_m, adam_v = (torch.zeros_like(x) for _ in range(3))  # the modifier and its Adam state, per example
    adam_t, steps_at_const = (torch.zeros(n, dtype=torch.long, device=x.device) for _ in range(2))
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    while active.any():
        i = active.nonzero().squeeze(1)
        wi = w[i].requires_grad_(True)
        with torch.enable_grad():
            new = torch.tanh(wi + w_start[i]) / 2 + 0.5
            logits = model(new)
            real = logits.gather(1, y[i, None]).squeeze(1)
            other = logits.masked_fill(F.one_hot(y[i], logits.shape[1]).bool(), float("-inf")).amax(1)
            distance = (new - x[i]).abs()
            loss = const[i].to(logits.dtype) * F.relu(real - other) \
                + F.relu(distance - tau[i].to(distance.dtype).view(view)).flatten(1).sum(1)
            (g,) = torch.autograd.grad(loss.sum(), wi)
        with torch.no_grad():  # Adam step on every active example (cw.py steps before it checks)
            adam_t[i] += 1
            t = adam_t[i].to(x.dtype).view(view)
            adam_m[i] = beta1 * adam_m[i] + (1 - beta1) * g
            adam_v[i] = beta2 * adam_v[i] + (1 - beta2) * g * g
            denom = adam_v[i].sqrt() / (1 - beta2 ** t).sqrt() + adam_eps
            w[i] = w[i] - lr / (1 - beta1 ** t) * adam_m[i] / denom
            new, wrong, linf = new.detach(), logits.argmax(1) != y[i], distance.flatten(1).amax(1)
            success = wrong & (linf < eps)
            x_adv[i[success]] = new[success]
            aborted = ~success & wrong & abort_early & (loss < 1e-4 * const[i])
            # an aborted descent restarts at its image with a smaller tau, or fails when tau gets too small
            new_tau = torch.minimum(tau[i], linf.double()) * decrease_factor
            restart = aborted & (new_tau > min_tau)
            r = i[restart]
            tau[r], w_start[r] = new_tau[restart], torch.atanh(0.9999 * (2 * new[restart] - 1))
            w[r], adam_m[r], adam_v[r], adam_t[r], steps_at_const[r] = 0.0, 0.0, 0.0, 0, 0
            # otherwise one more step at this c; after max_iterations, c grows, and past largest_const the descent fails
            going = ~success & ~aborted
            g_i = i[going]
            steps_at_const[g_i] += 1
            grow = g_i[steps_at_const[g_i] == max_iterations]
            const[grow] *= const_factor
            steps_at_const[grow] = 0
            failed = i[aborted & ~restart]
            active[i[success]] = active[failed] = False
            active[grow[const[grow] >= largest_const]] = False
    return x_adv


# ================================================================================================
# Learned attackers and optimisers: the networks and the attacks they run. Their training steps are
# below (l2l_step, rnn_adv_step, rnn_trades_step); the harness builds them (setup_l2l, setup_rnn).
#
# L2L (Jiang et al., "Learning to Defend by Learning to Attack"): a CNN g(A; phi) maps the attacker
# input A to a perturbation eps * tanh(.), so ||delta||_inf <= eps holds by construction.
#   naive:  A = x
#   grad:   A = [x, grad_x CE(f(x), y) / max|grad|]   (one scalar max over the whole batch; detached)
#   K-step: the grad attacker applied K times with shared phi, total projected onto the eps-ball.
# Architectures and details follow the poster and the official code (attacker.py, adv_loss.py).


class GenBlock(nn.Module):
    """The official code's SNGAN-style residual block: BN(no affine)-PReLU-conv3x3-BN(no affine)-PReLU-
    conv3x3, plus a learnable 1x1 shortcut when the width changes. Xavier-uniform init, gain sqrt 2
    on the 3x3 convs and 1 on the shortcut (as attacker.py)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c_in, affine=False), nn.PReLU(), nn.Conv2d(c_in, c_out, 3, 1, 1),
                                  nn.BatchNorm2d(c_out, affine=False), nn.PReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        for conv in (self.body[2], self.body[5]):
            nn.init.xavier_uniform_(conv.weight, math.sqrt(2))
        if c_in != c_out:
            nn.init.xavier_uniform_(self.shortcut.weight, 1.0)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class SlimAttacker(nn.Module):
    """The poster's "Attacker Architectures" table (attacker.py's SlimAttacker): conv3x3/128 stride 2
    (BN eps 1e-3, ReLU); GenBlocks 128->256->128; BN; deconv 4x4/16 stride 2 (BN, ReLU); conv3x3 on
    [deconv output, attacker input] to the image channels; delta = eps * tanh(s * out), s learnable
    from 5. Stride 2 in the first conv is the only reading under which 32x32 stays 32x32 (the poster gives no
    strides; a choice, README). `width` (128 in the paper) sets the channels: width, 2 width, width."""

    def __init__(self, in_ch, out_ch, eps, width=128):
        super().__init__()
        self.eps, w = eps, width
        self.down = nn.Sequential(nn.Conv2d(in_ch, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w, eps=1e-3), nn.ReLU())
        self.blocks = nn.Sequential(GenBlock(w, 2 * w), GenBlock(2 * w, w), nn.BatchNorm2d(w, affine=False))
        self.up = nn.Sequential(nn.ConvTranspose2d(w, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16, eps=1e-3), nn.ReLU())
        self.out = nn.Conv2d(16 + in_ch, out_ch, 3, 1, 1, bias=False)
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, attacker_input):
        h = self.up(self.blocks(self.down(attacker_input)))
        # tanh and the eps scale in fp32: under bf16 autocast, eps * tanh(.) rounded to bf16 exceeds eps
        return self.eps * torch.tanh(self.scale * self.out(torch.cat([h, attacker_input], 1)).float())


class WideAttacker(nn.Module):
    """The released training scripts' attacker (attacker.py's WideAttacker), no down/up-sampling:
    conv3x3/64 (BN, ReLU); GenBlocks 64->128->256->128->64; BN; conv3x3 to the image channels;
    delta = eps * tanh(out). `width` 128 gives the released channels (64, 128, 256, 128, 64)."""

    def __init__(self, in_ch, out_ch, eps, width=128):
        super().__init__()
        self.eps = eps
        b = max(1, width // 2)
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b, eps=1e-3), nn.ReLU(),
            GenBlock(b, 2 * b), GenBlock(2 * b, 4 * b), GenBlock(4 * b, 2 * b), GenBlock(2 * b, b),
            nn.BatchNorm2d(b, affine=False), nn.Conv2d(b, out_ch, 3, 1, 1))

    def forward(self, attacker_input):
        return self.eps * torch.tanh(self.net(attacker_input).float())  # fp32, as SlimAttacker


def l2l_attacker_optimizer(attacker: nn.Module) -> torch.optim.Optimizer:
    """The attacker's optimiser in the L2L code (train_l2l_{1,2}_cifar10.py): Adam, lr 1e-3, weight decay 2e-4."""
    return torch.optim.Adam(attacker.parameters(), lr=1e-3, weight_decay=2e-4)


def scaled_input_grad(model, x, y, batch_max=None) -> torch.Tensor:
    """g / max|g| with g = grad_x CE(f(x), y) and one max over the whole batch (adv_loss.py); no graph.
    batch_max, when given, maps this batch's max to the one to divide by (data parallelism passes the max over
    every process's shard, as the batch is the global one)."""
    g = input_grad(model, x, y)
    scale = g.abs().amax()
    if batch_max is not None:
        scale = batch_max(scale)
    return g / scale.clamp_min(1e-12)


def l2l_perturb(attacker, model, x, y, eps, variant: str, steps: int = 1, step_size=None, batch_max=None):
    """x_adv from the L2L attacker (Jiang et al., poster table "L2L variants"; adv_loss.py), K = `steps`:
      naive:  x_adv = clamp(x + g(x; phi), 0, 1)                                   (adv_loss_l2l_0)
      grad:   x_adv = clamp(x + g([x, g_hat(x)]; phi), 0, 1)                       (adv_loss_l2l_1)
      multi (the poster's 2-step L2L, adv_loss_l2l_2):
              delta^1 = g([x, g_hat(x)]);  for k = 2..K:  x^k = clamp(x + delta^{k-1}, 0, 1),
              delta^k = Pi_eps(delta^{k-1} + g([x^k, g_hat(x^k)]));  x_adv = clamp(x + delta^K, 0, 1)
              x^k keeps its graph, so phi's gradient also flows through the earlier steps (as adv_loss.py);
      k-step (adv_loss_l2l_k, step `step_size` = s):
              x^0 = x;  x^{k+1} = clamp(x^k + (s / eps) g([x^k, g_hat(x^k)].detach()), 0, 1);
              x_adv = clamp(x + Pi_eps(x^K - x), 0, 1): each step clamped to the image, projected once at the end,
              the attacker's input detached (phi's gradient reaches it through the sum of steps only).
    Each normalised gradient g_hat is a constant (scaled_input_grad)."""
    if variant == "naive":
        return (x + attacker(x)).clamp(0, 1)
    if variant == "k-step":
        x_k = x
        for _ in range(steps):
            attacker_input = torch.cat([x_k, scaled_input_grad(model, x_k, y, batch_max)], 1).detach()
            x_k = (x_k + attacker(attacker_input) * (step_size / eps)).clamp(0, 1)
        return (x + (x_k - x).clamp(-eps, eps)).clamp(0, 1)
    delta = attacker(torch.cat([x, scaled_input_grad(model, x, y, batch_max)], 1).detach())
    for _ in range(steps - 1 if variant == "multi" else 0):  # grad: no further step
        x_k = (x + delta).clamp(0, 1)
        attacker_input = torch.cat([x_k, scaled_input_grad(model, x_k, y, batch_max)], 1)  # x_k keeps its graph
        delta = (delta + attacker(attacker_input)).clamp(-eps, eps)  # Pi_B(eps)
    return (x + delta).clamp(0, 1)


# RNN learned optimiser (Xiong & Hsieh, "Improved Adversarial Training via Learned Optimizer"). No official
# code exists and the full text was not available: the design is this project's, within the paper's words (a
# recurrent network applied coordinate-wise, fed gradient information, emitting update directions and step sizes,
# trained on the inner loss over the intermediate iterates, co-trained with theta). Each choice is a flag or a
# keyword default; the variants tried, and why 'sign-step' is the default, are in README (Methods, "RNN-Adv").


def preprocess_gradient(g: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. (2016), appendix A: each coordinate g becomes (log|g| / p, sign g) when |g| >= e^-p,
    else (-1, e^p g). Makes the LSTM's input independent of the gradient's scale. Shape (..., 2)."""
    big = g.abs() >= math.exp(-p)
    first = torch.where(big, g.abs().clamp_min(1e-38).log() / p, torch.full_like(g, -1.0))
    second = torch.where(big, g.sign(), g * math.exp(p))
    return torch.stack([first, second], -1)


class LSTMOptimizer(nn.Module):
    """--rnn-design lstm: Andrychowicz et al.'s coordinate-wise LSTM (one tiny LSTM shared by every input
    coordinate, batched over all pixels of all images), fed the preprocessed input gradient alone, emitting a
    bounded update per coordinate:  (u_t, h_{t+1}) = m_phi(g_t, h_t),  u_t = eps * tanh(W h_{t+1} + b)
    (a choice: the largest step that stays in the ball). Two layers of 20 units, as Andrychowicz et al."""

    def __init__(self, hidden=20, layers=2, preprocess=True):
        super().__init__()
        self.preprocess = preprocess
        sizes = [2 if preprocess else 1] + [hidden] * layers
        self.cells = nn.ModuleList(nn.LSTMCell(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(hidden, 1)
        nn.init.normal_(self.out.weight, std=0.01)  # small first updates (a choice)
        nn.init.zeros_(self.out.bias)

    def forward(self, g, state, eps, **_):
        shape = g.shape
        h = preprocess_gradient(g.reshape(-1)) if self.preprocess else g.reshape(-1, 1)
        new_state = []
        for i, cell in enumerate(self.cells):
            hc = cell(h, None if state is None else state[i])
            new_state.append(hc)
            h = hc[0]
        return eps * torch.tanh(self.out(h).float()).reshape(shape), new_state  # fp32 under autocast


def relative_to_mean(g: torch.Tensor) -> torch.Tensor:
    """g divided by its example's mean |g| (an all-zero gradient stays zero)."""
    return g / g.abs().flatten(1).mean(1).clamp_min(1e-30).view(-1, *[1] * (g.dim() - 1))


class SignStepRNN(nn.Module):
    """--rnn-design sign-step (default): a coordinate-wise GRU that adapts PGD's step instead of replacing it.
    Per coordinate i of x'_t it reads (all constants for phi, first-order L2O)
        f = [sign g_i, g_i / mean_j |g_j| (per example, clipped to +-5, / 5), (x'_i - x_i) / eps,
             u_{t-1,i} / alpha, t / T]
    and, with h = GRU(f, h) and (o1, o2) = W h + b, steps
        u_i = alpha * (4 ** tanh(o1_i) * sign(g_i) + tanh(o2_i)),
    alpha = --step-size: a step size between alpha/4 and 4 alpha per coordinate and step, and a direction
    correction of up to alpha, both learned. W and b start at zero, so an untrained m_phi takes exactly PGD's
    steps (alpha sign g) and training can only move it away from PGD where that raises the inner loss. 8 hidden
    units: 378 parameters. This design is this project's (no official code exists; README, Methods).
    The GRU runs on every coordinate of the batch, so its cost is memory traffic: it is nn.GRUCell's function (the
    same outputs on the five features, tested) written gate by gate (r, z, n; one product per gate, no slices of
    wide outputs) in fp32 outside autocast, one column per coordinate in the tensors' memory order (short, wide
    products; no layout copies), t/T folded into the input bias."""

    FEATURES = 5

    def __init__(self, hidden=8):
        super().__init__()
        self.cell = nn.GRUCell(self.FEATURES, hidden)  # holds the GRU's parameters; forward applies them
        self.out = nn.Linear(hidden, 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, g, state, eps, alpha, x_adv, x, u_prev, progress):
        order = sorted(range(g.dim()), key=lambda d: -g.stride(d))  # g's dimensions in memory order (NHWC too)
        rows = lambda t: t.permute(order).reshape(-1)  # one row per coordinate, the same order for every tensor
        with torch.autocast(g.device.type, enabled=False):
            sign = rows(g.sign())
            f = torch.stack([sign, rows(relative_to_mean(g)).clamp(-5, 5) / 5, rows(x_adv - x) / eps,
                             rows(u_prev) / alpha]).detach()  # the first four features, (4, coordinates)
            c = self.cell
            w_i, w_h, b_h = c.weight_ih[:, :4].chunk(3), c.weight_hh.chunk(3), c.bias_hh[:, None].chunk(3)
            b_i = (c.bias_ih + progress * c.weight_ih[:, 4])[:, None].chunk(3)  # the fifth, t / T, is one number

            def pre(k):  # gate k's W_ik f + b_ik + W_hk h + b_hk (r: k = 0, z: 1); h_0 = 0 needs no product
                p = torch.addmm(b_i[k] + b_h[k], w_i[k], f)
                return p if state is None else torch.addmm(p, w_h[k], state)

            r, z = torch.sigmoid(pre(0)), torch.sigmoid(pre(1))
            h_n = b_h[2] if state is None else torch.addmm(b_h[2], w_h[2], state)
            n = torch.tanh(torch.addmm(b_i[2], w_i[2], f) + r * h_n)
            h = n - z * n if state is None else n + z * (state - n)  # (1 - z) n + z h
            o1, o2 = torch.addmm(self.out.bias[:, None], self.out.weight, h)
            u = alpha * (4.0 ** torch.tanh(o1) * sign + torch.tanh(o2))
        return u.view([g.shape[d] for d in order]).permute([order.index(d) for d in range(g.dim())]), h


def rnn_optimizer_adam(rnn: nn.Module) -> torch.optim.Optimizer:
    """Adam for m_phi (Andrychowicz et al.'s choice), its lr alpha2 of Algorithm 1: 1e-2 for SignStepRNN, 1e-3 for
    LSTMOptimizer (a choice, measured on a fixed MNIST classifier: README, RNN-Adv variants)."""
    return torch.optim.Adam(rnn.parameters(), lr=1e-3 if isinstance(rnn, LSTMOptimizer) else 1e-2)


def rnn_attack(rnn, model, x, y, eps, steps, alpha, init="uniform", trades=False, weights="uniform",
               learn=True, horizon=None, per_example=False):
    """The learned inner maximisation (Algorithm 1 of Xiong & Hsieh as this project reconstructs it; README, Methods,
    "RNN-Adv / RNN-TRADES"), on L_inner = CE, or with `trades` KL(f(x) || f(x')) (inner_loss):
      1. x'_0 = start_point(x, eps, init): Pi_C(x + U(-eps, eps)) ("uniform") or x + 0.001 N(0, I) ("normal", as TRADES)
      2. for t = 0..T-1:  g_t = grad_x' L_inner(x'_t)  (a constant for phi: first-order L2O)
                          (u_t, h) = m_phi(g_t, h);   x'_{t+1} = Pi_C(x'_t + u_t)
      3. L(phi) = sum_{t=1..T} w_t mean_i L_inner(x'_t)   (the intermediate iterates; w: 'uniform' w_t = 1,
         'last' only t = T, 'linear' w_t = t / T)
    alpha is the sign-step design's step (--step-size); the lstm design bounds its update by eps instead.
    Step 3 without the classifier's graph: phi reaches L_inner(x'_t) only through x'_t, and grad_x' L_inner(x'_t)
    is g_t, which step 2 computes anyway (at t = T one more pass). So
        grad_phi L(phi) = sum_t w_t g_t . dx'_t/dphi = grad_phi sum_t w_t <sg(g_t), x'_t> / B    (exactly)
    and the returned objective is that surrogate: backpropagating it touches only m_phi and the projections, not
    T copies of the classifier (same gradient, a fraction of the time and memory).
    With per_example (--rnn-objective per-example, a choice) each example's g_t is divided by its mean |g_t| (a
    constant) before the sum: every example then pulls on phi equally, where the plain loss lets the examples
    that are already misclassified (large CE gradients) outweigh the confidently correct ones.
    Returns (x'_T, surrogate) with learn=True; (x'_T, None) in evaluation, where nothing is kept. The step
    feature is t / horizon: horizon = steps (the default) stretches the learned schedule over a longer evaluation;
    horizon = the training T replays it and runs past its end."""
    horizon = horizon or steps
    with torch.no_grad():  # TRADES' clean distribution, a constant
        logp_clean = F.log_softmax(model(x), 1) if trades else None
    x_adv = start_point(x, eps, init)  # step 1
    iterates, grads, state, u_prev = [], [], None, torch.zeros_like(x)
    for t in range(steps):  # step 2
        g = inner_grad(model, x_adv, y, logp_clean)
        if t > 0:
            grads.append(g)  # g_t at x'_t, t >= 1: step 3 needs it
        with torch.set_grad_enabled(learn):
            u, state = rnn(g, state, eps, alpha=alpha, x_adv=x_adv, x=x, u_prev=u_prev, progress=t / horizon)
            x_adv = project(x_adv + u, x, eps)
        iterates.append(x_adv)
        u_prev = u.detach()
    if not learn:
        return x_adv.detach(), None
    grads.append(inner_grad(model, x_adv, y, logp_clean))  # g_T
    w = {"uniform": [1.0] * steps, "last": [0.0] * (steps - 1) + [1.0],
         "linear": [(t + 1) / steps for t in range(steps)]}[weights]
    total = sum(w_t * ((relative_to_mean(g_t) if per_example else g_t) * x_t).sum() / x.shape[0]
                for w_t, g_t, x_t in zip(w, grads, iterates))  # step 3: the surrogate of sum_t w_t L_inner(x'_t)
    return x_adv.detach(), total


# ================================================================================================
# Training steps: one function per method, one minibatch update each. A step takes the networks, their
# optimisers, the batch (x in [0,1], y) and the method's hyperparameters as keywords, and returns
# (loss, number correct) as device tensors (no host sync inside the epoch). The classifier arrives in
# train mode; every attack inside runs with dropout off and BatchNorm in the `attack_bn` mode.


def sgd_update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def plain_step(model, optimizer, x, y):
    """Standard training: one optimiser step on CE(f(x), y); the outer minimisation of PGD-AT, Fast-AT, AdvTrain+BLS,
    L2L and RNN-Adv, given x_adv. Returns (loss, number correct)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    sgd_update(optimizer, loss)
    return loss.detach(), (logits.argmax(1) == y).sum()


def pgd_at_step(model, optimizer, x, y, *, eps, step_size, steps, start="uniform", attack_bn="train"):
    """PGD adversarial training (Madry et al. 2018, eq. 2.1): min_theta E max_{delta in S} L(theta, x + delta, y).
    1. inner max: PGD-K (`steps` steps of `step_size`) from `start`, BN in `attack_bn` mode, dropout off;
    2. outer min: one SGD step on CE(f(x_adv), y), model in train mode."""
    with attack_mode(model, attack_bn):
        x_adv = pgd(model, x, y, eps, step_size, steps, start=start)  # step 1
    return plain_step(model, optimizer, x_adv, y)  # step 2


def trades_loss(logits_clean, logits_adv, y, beta):
    """TRADES' outer objective CE(f(x), y) + beta sum KL(f(x) || f(x')) / B. The KL is taken from
    log-probabilities: the value of trades.py's KLDivLoss(softmax(f(x))), but its gradient stays finite where a
    clean probability underflows to 0 (p log p has an infinite slope there)."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits_clean, y) + beta * kl


def trades_step(model, optimizer, x, y, *, eps, step_size, steps, beta, start="normal", attack_bn="eval"):
    """TRADES (Zhang et al. 2019, Algorithm 1; objective CE(f(x), y) + beta max KL(f(x) || f(x'))).
    1. x' by trades_attack (K sign steps on the KL from x + 0.001 N(0, I), BN in eval mode as in trades.py);
    2. loss = CE(f(x), y) + beta * sum KL(f(x) || f(x')) / B  (KL summed, divided by the batch: 'batchmean');
    3. one SGD step. The clean distribution is not detached in the outer loss (as in trades.py). trades.py runs
       f(x) twice in train mode (once for the CE, once for the KL); here one pass serves both: the same value
       without dropout, one BN-statistics update instead of two (a deliberate difference, README)."""
    with attack_mode(model, attack_bn):
        x_adv = trades_attack(model, x, eps, step_size, steps, start)  # step 1
    logits_clean, logits_adv = model(x), model(x_adv)  # step 2
    loss = trades_loss(logits_clean, logits_adv, y, beta)
    sgd_update(optimizer, loss)  # step 3
    return loss.detach(), (logits_adv.argmax(1) == y).sum()


def fast_at_step(model, optimizer, x, y, *, eps, step_size, attack_bn="train", clamp_start=True):
    """Fast-AT (Wong et al. 2020, Algorithm 3, "FGSM adversarial training with random initialization"):
    1. delta ~ U(-eps, eps), clamped to the image box (CIFAR10/train_fgsm.py; MNIST/train_mnist.py takes its
       gradient at the unclamped x + delta: clamp_start=False);
    2. delta <- Pi_C(delta + alpha sign(grad_delta L)), alpha = `step_size` (1.25 eps in the paper);
    3. one optimiser step on CE(f(x + delta), y). BN stays in train mode during the attack (official code)."""
    with attack_mode(model, attack_bn):
        x_adv = fgsm(model, x, y, eps, step_size, rand_init=True, clamp_start=clamp_start)  # steps 1-2
    return plain_step(model, optimizer, x_adv, y)  # step 3


def fast_bat_step_size(eps: float) -> float:
    """The lower-level step a of the official train.py: 5000/255 for eps <= 8/255, else 2000/255."""
    return 5000 / 255 if eps <= 8 / 255 + 1e-9 else 2000 / 255


def box_bounds(x: torch.Tensor, eps: float):
    """C in coordinates: p <= delta <= q with p = max(-eps, -x), q = min(eps, 1 - x)."""
    return torch.clamp(-x, min=-eps), torch.clamp(1 - x, max=eps)


def fast_bat_backward(model, x, y, eps, step_size, lam, ig_ratio=1.0, tol=1e-7, attack_bn="train") -> dict:
    """Fast-BAT (Zhang et al. 2022), the gradient of one upper-level step, left in the parameters' .grad:
        g_theta = grad_theta l_tr(theta, delta*) + ig_ratio * (1/lam) grad_theta < grad_delta l(theta; z), sg(H_C grad_delta l_tr(delta*)) >
    i.e. eq. (14) with the implicit gradient of eq. (13) under l_atk = -l_tr, ig_ratio = alpha2 / alpha1.
    Steps, in the order of the official trainer.py (mode fast_bat), with a = `step_size` (fast_bat_step_size: 5000/255
    for eps <= 8/255, else 2000/255) and C = {p <= delta <= q} (box_bounds):
      1. delta0 = Pi_C(U(-eps, eps))                              (random start)
      2. z = Pi_C(delta0 + a grad_delta sum CE(x + delta0)), detached (linearisation point; non-sign step)
      3. g_z = grad_delta sum CE(x + z), with its graph kept for step 7
      4. delta* = Pi_C(z + a sg(g_z))                             (eq. 9, lower-level closed form, lambda_low = 1/a)
      5. H = 1 where p + tol < delta* < q - tol                   (the inactive constraints of C)
      6. v = H * grad_delta sum CE(x + delta*) / lam, theta frozen (outer gradient w.r.t. delta)
      7. implicit term: backprop sum_i <g_z,i, v_i> / B to theta  (eq. 13; double backprop, no Hessian)
      8. standard term: backprop sum CE(x + delta*) / B; .grad holds both terms (eq. 14).
    Losses are sum-reduced wherever a per-example input gradient is taken (the code's reduction), so a
    and lam mean the same at every batch size. The mixed derivative is taken at z, where the closed form
    of step 3 is differentiated: the official code does the same (trainer.py builds the graph of the gradient at z,
    not at delta*). Steps 1-3 are the lower level (the attack): BN in `attack_bn` mode (train in the code), dropout
    off (attack_mode); steps 6 and 8 evaluate the training loss l_tr in the caller's mode."""
    p, q = box_bounds(x, eps)
    with attack_mode(model, attack_bn):
        delta0 = (torch.empty_like(x).uniform_(-eps, eps)).clamp(p, q)  # step 1
        # clamp(p, q) is the code's clamp to [-eps, eps] followed by the clamp to the image box, in one
        z = (delta0 + step_size * input_grad(model, x + delta0, y)).clamp(p, q).detach()  # step 2
        z_var = z.clone().requires_grad_(True)
        grad_z = torch.autograd.grad(F.cross_entropy(model(x + z_var), y, reduction="sum"), z_var,
                                     create_graph=True)[0]  # step 3: kept for the double backprop of step 7
    delta = (z + step_size * grad_z.detach()).clamp(p, q)  # step 4
    mask = ((delta > p + tol) & (delta < q - tol)).to(x.dtype)  # step 5
    v = mask * input_grad(model, x + delta, y) / lam  # step 6 (input_grad leaves theta's .grad alone)
    n = x.shape[0]
    model.zero_grad(set_to_none=True)
    ((grad_z * v).sum() * (ig_ratio / n)).backward()  # step 7
    logits = model(x + delta)
    loss = F.cross_entropy(logits, y, reduction="sum") / n  # step 8
    loss.backward()  # accumulates onto the implicit term, before the optimiser applies momentum and decay
    return {"loss": loss.detach(), "logits": logits.detach(), "z": z, "delta": delta, "mask": mask}


def fast_bat_step(model, optimizer, x, y, *, eps, step_size=None, lam=10.0, ig_ratio=1.0, attack_bn="train"):
    """Fast-BAT (Zhang et al. 2022, eq. 14): one SGD step on the gradient of fast_bat_backward, model in train
    mode, its lower level (step `step_size` = a, default fast_bat_step_size(eps); lambda 10 as train.py) with BN in
    `attack_bn` mode (train, as the official code) and dropout off; the optimiser's lr is alpha1, and alpha2 =
    ig_ratio * alpha1 (1: one learning rate, as the code)."""
    step_size = fast_bat_step_size(eps) if step_size is None else step_size
    out = fast_bat_backward(model, x, y, eps, step_size, lam, ig_ratio, attack_bn=attack_bn)
    optimizer.step()
    return out["loss"], (out["logits"].argmax(1) == y).sum()


# GradAlign's gamma by eps (in /255), from the GradAlign README as the Fast-BAT code copies it.
GRADALIGN_GAMMA = {2: 0.036, 4: 0.063, 6: 0.112, 8: 0.200, 10: 0.356, 12: 0.632, 14: 1.124, 16: 2.000}


def gradalign_gamma(eps: float) -> float:
    """gamma for eps: the table's value, log-linear between its entries; outside 2/255..16/255 the nearest
    end (a choice: MNIST's 0.3 gets 2.0)."""
    k = min(max(eps * 255, 2.0), 16.0)
    lo = max(e for e in GRADALIGN_GAMMA if e <= k)
    hi = min(e for e in GRADALIGN_GAMMA if e >= k)
    if lo == hi:
        return GRADALIGN_GAMMA[lo]
    t = (k - lo) / (hi - lo)
    return math.exp((1 - t) * math.log(GRADALIGN_GAMMA[lo]) + t * math.log(GRADALIGN_GAMMA[hi]))


def gradalign_penalty(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """GradAlign's 1 - mean_i cos(g1_i, g2_i) over the examples whose two gradients are both non-zero (the
    official code drops the others from the mean: their cosine is undefined); 0 when none is left."""
    g1, g2 = g1.flatten(1), g2.flatten(1)
    norm1, norm2 = g1.norm(dim=1, keepdim=True), g2.norm(dim=1, keepdim=True)
    keep = ((norm1 != 0) & (norm2 != 0)).squeeze(1)  # chosen by torch.where, not by indexing: no host sync
    cos = (g1 / torch.where(norm1 != 0, norm1, 1) * g2 / torch.where(norm2 != 0, norm2, 1)).sum(1)
    return torch.where(keep.any(), 1 - torch.where(keep, cos, 0).sum() / keep.sum().clamp_min(1), g2.sum() * 0.0)


def fast_at_ga_step(model, optimizer, x, y, *, eps, step_size, gamma=None, attack_bn="train"):
    """Fast-AT with GradAlign (Andriushchenko & Flammarion, NeurIPS 2020), as the Fast-BAT code's fast_at_ga:
    1. x_adv = FGSM from x (zero init), step `step_size` (1.25 eps), BN in train mode, dropout off;
    2. g1 = grad_x CE(f(x), y), a constant; g2 = grad_x CE(f(x + eta), y), eta ~ U(-eps, eps), with its graph
       (the probe x + eta is not clamped to [0,1], as in the GradAlign code: it is a gradient probe, not an attack);
    3. loss = CE(f(x_adv), y) + gamma (1 - mean_i cos(g1_i, g2_i)) (gradalign_penalty: examples with a zero
       gradient left out); one SGD step (double backprop through g2). g1 and g2 belong to the training loss and
       run in the model's training mode. gamma defaults to gradalign_gamma(eps)."""
    gamma = gradalign_gamma(eps) if gamma is None else gamma
    with attack_mode(model, attack_bn):
        x_adv = fgsm(model, x, y, eps, step_size)  # step 1
    g1 = input_grad(model, x, y)  # step 2
    probe = (x + torch.empty_like(x).uniform_(-eps, eps)).requires_grad_(True)
    g2 = torch.autograd.grad(F.cross_entropy(model(probe), y, reduction="sum"), probe, create_graph=True)[0]
    logits = model(x_adv)  # step 3
    loss = F.cross_entropy(logits, y) + gamma * gradalign_penalty(g1, g2)
    sgd_update(optimizer, loss)
    return loss.detach(), (logits.argmax(1) == y).sum()


def pgd_at_bls_step(model, optimizer, x, y, *, eps, steps, init_step=None, shrink=0.5, c=1e-4, tries=8,
                    start="uniform", attack_bn="train"):
    """AdvTrain+BLS (Xiong & Hsieh, Table 1): PGD-AT whose inner steps choose a per-example step size by
    backtracking line search (pgd_bls: first trial step `init_step`, default eps (a choice), x `shrink` per trial,
    `tries` trials, sufficient-increase constant c; BN in `attack_bn` mode), then one SGD step on CE(f(x_adv), y)."""
    init_step = eps if init_step is None else init_step
    with attack_mode(model, attack_bn):
        x_adv = pgd_bls(model, x, y, eps, steps, init_step, shrink, c, tries, start)
    return plain_step(model, optimizer, x_adv, y)


def l2l_attacker_step(model, attacker, attacker_optimizer, x, y, *, eps, variant, steps=1, step_size=None,
                      attacker_steps=1, batch_max=None):
    """L2L's attacker update (Jiang et al.; step 2 of l2l_step): `attacker_steps` times, f in eval mode and fixed,
    the attacker in train mode, x_adv recomputed from phi; one Adam step on phi ascending CE(f(x_adv), y). The
    gradient is taken w.r.t. phi only, so theta's .grad is never touched (the official code zeroes it instead).
    Both networks leave in the modes they came in."""
    params = list(attacker.parameters())
    with ModelMode(model, "eval"), ModelMode(attacker, "train"):
        for _ in range(attacker_steps):
            x_adv = l2l_perturb(attacker, model, x, y, eps, variant, steps, step_size, batch_max)
            attacker_loss = -F.cross_entropy(model(x_adv), y)
            for p, g in zip(params, torch.autograd.grad(attacker_loss, params)):
                p.grad = g
            attacker_optimizer.step()


def l2l_step(model, optimizer, attacker, attacker_optimizer, x, y, *, eps, variant, steps=1, step_size=None,
             attacker_steps=1, batch_max=None):
    """L2L (Jiang et al.: min_theta max_phi sum_i CE(f(x_i + g(A(x_i, y_i, theta); phi); theta), y_i)), one
    minibatch in the order of train_l2l_{1,2}_cifar10.py; `variant` naive / grad / multi and `steps`, `step_size`
    as l2l_perturb:
    1. classifier step: f in train mode, attacker in eval mode; x_adv from the attacker (its gradient
       feature computed with BN in train mode, updating BN statistics, as the official code does, and dropout
       off as in every attack); one SGD step on CE(f(x_adv), y), batch mean, no clean term;
    2. l2l_attacker_step: `attacker_steps` Adam ascent steps on phi against the updated theta.
    batch_max: see scaled_input_grad (data parallelism passes a max over every process's shard)."""
    model.train()  # step 1
    attacker.eval()
    with torch.no_grad(), attack_mode(model, "train"):  # phi gets nothing here
        x_adv = l2l_perturb(attacker, model, x, y, eps, variant, steps, step_size, batch_max)
    loss, n_correct = plain_step(model, optimizer, x_adv, y)
    l2l_attacker_step(model, attacker, attacker_optimizer, x, y, eps=eps, variant=variant, steps=steps,
                      step_size=step_size, attacker_steps=attacker_steps, batch_max=batch_max)  # step 2
    return loss, n_correct


def rnn_optimizer_step(model, rnn, rnn_optimizer, x, y, *, eps, steps, alpha, trades=False, start="uniform",
                       weights="uniform", per_example=False, attack_bn="eval"):
    """Steps 1-2 of rnn_adv_step / rnn_trades_step (Xiong & Hsieh, Algorithm 1): unroll m_phi for T = `steps` inner
    steps on the inner loss (CE, or with `trades` the KL to the clean output) with the classifier in `attack_bn`
    mode and dropout off, then one Adam ascent step on phi (the gradient w.r.t. phi only; theta's .grad untouched).
    Returns x'_T, detached."""
    with attack_mode(model, attack_bn):
        x_adv, rnn_objective = rnn_attack(rnn, model, x, y, eps, steps, alpha, start, trades, weights,
                                          learn=True, horizon=steps, per_example=per_example)  # step 1
        params = list(rnn.parameters())
        for p, g in zip(params, torch.autograd.grad(-rnn_objective, params, allow_unused=True)):  # step 2 (ascent)
            p.grad = torch.zeros_like(p) if g is None else g  # T = 1: h_0 = 0 leaves the hidden weights unused
        rnn_optimizer.step()
    return x_adv


def rnn_adv_step(model, optimizer, rnn, rnn_optimizer, x, y, *, eps, steps, alpha, start="uniform",
                 weights="uniform", per_example=False, attack_bn="eval"):
    """RNN-Adv (Xiong & Hsieh, Algorithm 1 "RNN-based adversarial training" with PGD-AT's loss; a reconstruction:
    no official code exists), per minibatch M (Algorithm 1, step 5):
    1. unroll m_phi for T = `steps` inner steps on CE (rnn_optimizer_step, rnn_attack);
    2. phi <- phi + alpha2 grad_phi L(phi): one Adam ascent step on the intermediate-iterate loss;
    3. theta <- theta - alpha1 grad_theta CE(f(x'_T), y) with x'_T detached: one SGD step.
    The same unrolled pass serves both updates, so phi and theta see the same adversarial examples. alpha is the
    sign-step design's step (the lstm design bounds its updates by eps)."""
    x_adv = rnn_optimizer_step(model, rnn, rnn_optimizer, x, y, eps=eps, steps=steps, alpha=alpha, start=start,
                               weights=weights, per_example=per_example, attack_bn=attack_bn)  # steps 1-2
    return plain_step(model, optimizer, x_adv, y)  # step 3


def rnn_trades_step(model, optimizer, rnn, rnn_optimizer, x, y, *, eps, steps, alpha, beta, start="normal",
                    weights="uniform", per_example=False, attack_bn="eval"):
    """RNN-TRADES (Xiong & Hsieh, Algorithm 1 with TRADES' loss; a reconstruction): as rnn_adv_step, with the inner
    loss KL(f(x) || f(x')) and step 3 one SGD step on CE(f(x), y) + beta KL(f(x) || f(x'_T)) (trades_loss)."""
    x_adv = rnn_optimizer_step(model, rnn, rnn_optimizer, x, y, eps=eps, steps=steps, alpha=alpha, trades=True,
                               start=start, weights=weights, per_example=per_example,
                               attack_bn=attack_bn)  # steps 1-2
    logits_clean, logits = model(x), model(x_adv)  # step 3
    loss = trades_loss(logits_clean, logits, y, beta)
    sgd_update(optimizer, loss)
    return loss.detach(), (logits.argmax(1) == y).sum()


# ================================================================================================
# PART II: THE HARNESS. Recipes and flags; data, models by name and checkpoints; the method table
# that binds flags to the steps of Part I; speed and scale; evaluation; the training loop;
# benchmark, report and main. Part I never calls anything below this line.


class UsageError(Exception):
    """A problem with the user's flags (a diverging --lr too), paths or files: main() prints one line, exits 2."""


# eval_step_frac, eval_steps: the default evaluation PGD, step eps / 4 for 20 steps; MNIST (TRADES, Madry): 0.01 x 40
DATASETS = {
    "mnist": dict(shape=(1, 28, 28), classes=10, n_train=60000, mean=(0.1307,), std=(0.3081,), augment="none",
                  eps=0.3, eval_step_frac=1 / 30, eval_steps=40),
    "cifar10": dict(shape=(3, 32, 32), classes=10, n_train=50000, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2470, 0.2435, 0.2616), augment="crop-flip", eps=8 / 255, eval_step_frac=0.25, eval_steps=20),
    "cifar100": dict(shape=(3, 32, 32), classes=100, n_train=50000, mean=(0.5071, 0.4865, 0.4409),
                     std=(0.2673, 0.2564, 0.2762), augment="crop-flip", eps=8 / 255, eval_step_frac=0.25,
                     eval_steps=20),
    "svhn": dict(shape=(3, 32, 32), classes=10, n_train=73257, mean=(0.4377, 0.4438, 0.4728),
                 std=(0.1980, 0.2010, 0.1970), augment="crop", eps=8 / 255, eval_step_frac=0.25, eval_steps=20),
}

L2L_VARIANTS = {"l2l-naive": "naive", "l2l-grad": "grad", "l2l-2step": "multi"}

# Per-method recipes: "cifar" for cifar10, cifar100 and svhn, "mnist" for MNIST, the official file named beside each.
# Inputs reach the network as the official code feeds them (README, Methods); every value is a flag.
# TRADES' MNIST optimiser (train_trades_mnist.py: lr 0.01, x0.1 when epoch >= 55, 75, 90, counted from 1, SmallCNN).
TRADES_MNIST = dict(model="smallcnn", epochs=100, lr=0.01, weight_decay=0.0, lr_schedule="multistep",
                    lr_milestones=(55, 75, 90), lr_milestone_base=1)
# Rice et al.'s robust_overfitting (train_cifar.py, preactresnet.py, utils.py): PreActResNet-18, 200 epochs, lr 0.1
# x0.1 after 100 and 150 full epochs, inputs normalised with std 0.2471, the 1x1 shortcut on relu(bn1(x)),
# reflect-padded crops.
RICE_CIFAR = dict(model="preactresnet18", epochs=200, lr=0.1, weight_decay=5e-4, lr_schedule="multistep",
                  lr_milestones=(100, 150), lr_milestone_base=0, normalize="mean-std",
                  cifar10_std=(0.2471, 0.2435, 0.2616), preact_shortcut="activation", crop_pad="reflect")
# fast_adversarial's and Fast-BAT's: PreActResNet-18, cyclic lr 0 -> 0.2 -> 0 with CyclicLR's momentum cycle, wd 5e-4,
# one attack step with BN in train mode.
CYCLIC_CIFAR = dict(model="preactresnet18", lr=0.2, weight_decay=5e-4, lr_schedule="cyclic", steps=1,
                    attack_bn="train", normalize="mean-std")
METHOD_DEFAULTS = {
    "plain": dict(cifar=dict(RICE_CIFAR, steps=0), mnist=dict(TRADES_MNIST, steps=0)),
    # Madry et al.: PGD-10 step 2/255 from a random start, BN in train mode while attacking as Madry's code
    # (cifar10_challenge#22); MNIST: PGD-40 step 0.01.
    "pgd-at": dict(cifar=dict(RICE_CIFAR, steps=10, step_size=2 / 255, attack_bn="train"),
                   mnist=dict(TRADES_MNIST, steps=40, step_size=0.01, attack_bn="train")),
    # TRADES (train_trades_cifar10.py): WRN-34-10, 10 steps of 0.007 from x + 0.001 N(0, I), lr 0.1 x0.1 when
    # epoch >= 75, 90, 100 (the 76-epoch run has two epochs at 0.01), wd 2e-4; MNIST beta 1, 40 steps of 0.01.
    "trades": dict(cifar=dict(model="wrn", epochs=76, lr=0.1, weight_decay=2e-4, lr_schedule="multistep",
                              lr_milestones=(75, 90, 100), lr_milestone_base=1, steps=10, step_size=0.007, beta=6.0,
                              attack_start="normal"),
                   mnist=dict(TRADES_MNIST, steps=40, step_size=0.01, beta=1.0, attack_start="normal")),
    # Fast-AT (CIFAR10/train_fgsm.py, utils.py: 15 epochs, step 1.25 eps, std 0.2471; MNIST/train_mnist.py,
    # mnist_net.py: MNISTNet, Adam, lr 0 -> 5e-3 at epoch 10 * 2 // 5 = 4 -> 0, batch 100, step 0.375, the random
    # start not clamped to the image box).
    "fast-at": dict(cifar=dict(CYCLIC_CIFAR, epochs=15, cifar10_std=(0.2471, 0.2435, 0.2616)),
                    mnist=dict(model="mnistnet", optimizer="adam", epochs=10, batch_size=100, lr=5e-3,
                               weight_decay=0.0, lr_schedule="cyclic", steps=1, attack_bn="train",
                               clamp_start=False, lr_peak=lambda epochs: epochs * 2 // 5 or epochs / 2)),
}
# Fast-BAT Table 1 (train.py): 20 epochs, the lr peaking at epoch 10 (--cyclic_milestone); Fast-AT-GA: FGSM from x
# with step 1.25 eps plus GradAlign. MNIST: SmallCNN, cyclic lr 0.05, 10 epochs (this project's choice).
for _name in ("fast-bat", "fast-at-ga"):
    METHOD_DEFAULTS[_name] = dict(cifar=dict(CYCLIC_CIFAR, epochs=20, lr_peak_epoch=10.0),
                                  mnist=dict(model="smallcnn", epochs=10, lr=0.05, weight_decay=0.0,
                                             lr_schedule="cyclic", steps=1, attack_bn="train"))
# L2L (train_l2l_{1,2}_cifar10.py): WRN-34-10, lr 0.1 x0.1 when epoch >= 30, 60, 90, wd 2e-4, 76 epochs, eps 0.031
# (run.sh passes it). MNIST has no L2L recipe in the sources: TRADES' MNIST optimiser is this project's choice.
for _name in L2L_VARIANTS:
    METHOD_DEFAULTS[_name] = dict(cifar=dict(model="wrn", epochs=76, lr=0.1, weight_decay=2e-4, lr_schedule="multistep",
                                             lr_milestones=(30, 60, 90), lr_milestone_base=1, steps=0),
                                  mnist=dict(TRADES_MNIST, steps=0))
# Xiong & Hsieh: AdvTrain+BLS, RNN-Adv and RNN-TRADES share the baseline they modify (T = --steps), attacking in eval
# mode. MNIST uses T = 10 for the RNN methods (a choice: the paper stresses few iterations), step 2.5 eps / T.
METHOD_DEFAULTS["pgd-at-bls"] = {k: dict(v, attack_bn="eval") for k, v in METHOD_DEFAULTS["pgd-at"].items()}
METHOD_DEFAULTS["rnn-adv"] = {k: dict(v, attack_bn="eval") for k, v in METHOD_DEFAULTS["pgd-at"].items()}
METHOD_DEFAULTS["rnn-trades"] = {k: dict(v) for k, v in METHOD_DEFAULTS["trades"].items()}
for _name in ("rnn-adv", "rnn-trades"):
    METHOD_DEFAULTS[_name]["mnist"].update(steps=10, step_size=0.075)

# Defaults shared by every method unless its table above says otherwise.
COMMON_DEFAULTS = dict(batch_size=128, optimizer="sgd", momentum=0.9, beta=6.0, attack_bn="eval", lr_milestones=(),
                       lr_milestone_base=0, attack_start="uniform", clamp_start=True, normalize="none",
                       preact_shortcut="input", crop_pad="zero")

# The defaults that follow from other flags (a flag left unset takes its entry's value, in this order, once the
# recipe's values are in): default(args, recipe, dataset spec).
DERIVED_DEFAULTS = (
    # Fast-AT's step is 1.25 eps, so it follows an overridden eps; the recipes with a step give theirs
    ("step_size", lambda a, recipe, spec: 1.25 * a.eps if a.method in ("fast-at", "fast-at-ga") else 0.0),
    ("width", lambda a, recipe, spec: 64 if a.model == "preactresnet18" else 10),
    ("augment", lambda a, recipe, spec: spec["augment"]),
    ("rnn_eval_steps", lambda a, recipe, spec: max(a.steps, 1)),
    ("eval_steps", lambda a, recipe, spec: spec["eval_steps"]),
    ("eval_step_size", lambda a, recipe, spec: a.eps * spec["eval_step_frac"]),
    # half-way, as fast_adversarial's CIFAR-10 script; its MNIST script peaks at epochs * 2 // 5
    ("lr_peak_epoch", lambda a, recipe, spec: recipe.get("lr_peak", lambda epochs: epochs / 2)(a.epochs)),
    ("val_step_size", lambda a, recipe, spec: 2.5 * a.eps / max(a.val_steps, 1)),  # Madry et al.'s rule
)
MODELS = ("smallcnn", "mnistnet", "vgg16", "preactresnet18", "wrn")


def parse_number(text: str) -> float:
    """'8/255' -> 0.03137..., '0.3' -> 0.3. Used by --eps and every step-size flag."""
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (write e.g. 0.3 or 8/255)")


def fmt_eps(value: float) -> str:
    """Print eps and step sizes the way papers write them: 8/255 when that is exact, else a decimal."""
    k = value * 255
    exact = value > 0 and abs(k - round(k)) < 1e-6 and float(f"{value:.4g}") != value  # 8/255, but 0.6 stays 0.6
    return f"{round(k)}/255" if exact else f"{value:.4g}"


def comma_numbers(text: str) -> list:
    """'100,150' -> [100.0, 150.0]: --lr-milestones and --input-std."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
        assert all(map(math.isfinite, values))
        return values
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of numbers, e.g. 100,150")


def paper_numbers(text: str) -> dict:
    """--paper 'clean=86.06,pgd=46.06' -> {'clean': 86.06, 'pgd': 46.06}: keys clean, worst_case or an attack."""
    try:
        parsed = {key: float(value) for key, _, value in (item.partition("=") for item in text.split(","))}
        assert set(parsed) <= {"clean", "worst_case", *EVAL_ATTACKS}
        return parsed
    except (AssertionError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=NUMBER,... with KEY clean, worst_case or an attack")


def bounded(convert: Callable, low, low_open=False, high=math.inf) -> Callable:
    """An argparse type: convert(text), refused unless at least `low` (above it if low_open) and below `high`."""
    def parse(text):
        value = convert(text)
        if not ((value > low if low_open else value >= low) and value < high):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if low_open else 'at least'} {low}" +
                                             (f" and below {high}" if high < math.inf else ""))
        return value

    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'" names the conversion
    return parse


# The types of the numeric flags: each value is checked as the command line is read.
COUNT, NONNEGATIVE_INT = bounded(int, 1), bounded(int, 0)
POSITIVE, NONNEGATIVE = bounded(float, 0, low_open=True), bounded(float, 0)
POSITIVE_NUMBER, NONNEGATIVE_NUMBER = bounded(parse_number, 0, low_open=True), bounded(parse_number, 0)  # 8/255
MOMENTUM, SEED = bounded(float, 0, high=1), bounded(int, 0, high=2 ** 32)
BOOL = argparse.BooleanOptionalAction


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is a UsageError: main() prints it as one line (no usage block) and exits 2."""

    def error(self, message):
        raise UsageError(f"{message} (see python l2l.py --help)")


# Every flag, once: its --help group, where it counts ("t": training, checked against last.pt by --resume; "m": the
# network and learned attacker, which --eval-only takes from the checkpoint; "e": evaluation), its add_argument
# keywords. No default means "per method and dataset" (METHOD_DEFAULTS, filled in by resolve_args).
FLAG_GROUPS = {"run": "run", "data": "data", "opt": "optimisation", "attack": "training-time attack", "learned":
               "learned attackers (rnn-*, l2l-*)", "eval": "evaluation", "speed": "speed and scale (same algorithms)"}
FLAGS = (
    ("run", "--method", "tm", dict(default="pgd-at", metavar="METHOD", help="one of: {methods}")),
    ("run", "--dataset", "tm", dict(default="cifar10", metavar="DATASET", help="one of: {datasets}")),
    ("run", "--model", "tm", dict(choices=MODELS, help="the network (default: per method)")),
    ("run", "--depth", "tm", dict(type=COUNT, default=34, help="WideResNet depth (6n+4)")),
    ("run", "--width", "tm", dict(type=COUNT, help="WideResNet widen factor (10), PreActResNet-18 base width (64)")),
    ("run", "--preact-shortcut", "tm", dict(choices=("input", "activation"), help="1x1 shortcut on x or relu(bn1(x))")),
    ("run", "--data-dir", "e", dict(default="./data", help="where <dataset>.npz or torchvision's files live")),
    ("run", "--out", "e", dict(help="output directory (default: runs/<method>_<dataset>)")),
    ("run", "--overwrite", "e", dict(action="store_true", help="replace an earlier run's files in --out")),
    ("run", "--resume", "", dict(action="store_true", help="continue the run in --out from last.pt")),
    ("run", "--eval-only", "", dict(metavar="CKPT", help="evaluate a checkpoint, no training")),
    ("run", "--device", "e", dict(default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")),
    ("run", "--seed", "te", dict(type=SEED, default=0, help="seeds weights, batches, random starts, AutoAttack")),
    ("run", "--quiet", "e", dict(action="store_true", help="no progress lines (they come at most every 10 s)")),
    ("run", "--report", "", dict(metavar="RUN", nargs="+", help="a markdown table of these runs")),
    ("run", "--paired", "", dict(metavar="RESULTS:ATTACK", nargs=2, help="two evaluations on the same test images: "
                                 "the difference and its exact McNemar p-value")),
    ("run", "--recipe", "", dict(help="the run.sh recipe this run reproduces (run.sh sets it)")),
    ("run", "--paper", "", dict(type=paper_numbers, metavar="NUMBERS", help="for --report: clean=86,pgd=46")),
    ("data", "--train-size", "t", dict(type=COUNT, help="use the first N training examples")),
    ("data", "--val-size", "t", dict(type=NONNEGATIVE_INT, default=1000, help="last N train images: best.pt")),
    ("data", "--test-size", "e", dict(type=COUNT, help="evaluate on the first N test examples")),
    ("data", "--normalize", "tm", dict(choices=("none", "mean-std"), help="the network's first layer")),
    ("data", "--input-std", "tm", dict(type=comma_numbers, metavar="S1,S2,S3", help="the std of --normalize mean-std")),
    ("data", "--crop-pad", "t", dict(choices=("zero", "reflect"), help="padding of the random crop")),
    ("data", "--augment", "t", dict(choices=("none", "crop", "crop-flip", "crop-flip-rotate"), help="on the device")),
    ("opt", "--epochs", "t", dict(type=COUNT, help="training epochs")),
    ("opt", "--batch-size", "tm", dict(type=COUNT, help="training batch (global under torchrun)")),
    ("opt", "--lr", "t", dict(type=POSITIVE, help="peak learning rate")),
    ("opt", "--optimizer", "t", dict(choices=("sgd", "adam"), help="the classifier's optimiser")),
    ("opt", "--momentum", "t", dict(type=MOMENTUM, help="SGD momentum (cyclic: its value at lr 0)")),
    ("opt", "--weight-decay", "t", dict(type=NONNEGATIVE, help="weight decay")),
    ("opt", "--lr-schedule", "t", dict(choices=("multistep", "cyclic", "constant"),
                                       help="multistep: x0.1 at each milestone; cyclic: 0 -> --lr -> 0, one triangle")),
    ("opt", "--lr-milestones", "t", dict(type=comma_numbers, help="multistep: x0.1 at, e.g. 100,150")),
    ("opt", "--lr-milestone-base", "t", dict(type=int, choices=(0, 1), help="how a milestone m counts: 1, from epoch "
                                             "m counted from 1 (TRADES, L2L); 0, after m epochs (MultiStepLR)")),
    ("opt", "--lr-peak-epoch", "t", dict(type=float, help="cyclic: epoch where lr peaks")),
    ("attack", "--eps", "te", dict(type=parse_number, help="l_inf budget (default: 8/255, MNIST 0.3)")),
    ("attack", "--step-size", "tm", dict(type=NONNEGATIVE_NUMBER, help="attack step (rnn-*: alpha)")),
    ("attack", "--steps", "tm", dict(type=NONNEGATIVE_INT, help="attack iterations (rnn-*: T)")),
    ("attack", "--beta", "t", dict(type=NONNEGATIVE, help="TRADES robustness weight")),
    ("attack", "--attack-bn", "t", dict(choices=("eval", "train"), help="BN mode while attacking")),
    ("attack", "--attack-start", "tm", dict(choices=("uniform", "normal"), help="x + U(-eps, eps), x + 0.001 N(0,I)")),
    ("attack", "--clamp-start", "t", dict(action=BOOL, help="fast-at: clamp the random start to [0,1]")),
    ("learned", "--rnn-design", "tm", dict(default="sign-step", choices=("sign-step", "lstm"), help="m_phi's design")),
    ("learned", "--rnn-weights", "t", dict(default="uniform", choices=("uniform", "last", "linear"),
                                           help="w_t of the iterates in phi's objective")),
    ("learned", "--rnn-objective", "t", dict(default="loss", choices=("loss", "per-example"), help="phi's objective")),
    ("learned", "--rnn-hidden", "tm", dict(type=COUNT, help="m_phi's hidden units (default: sign-step 8, lstm 20)")),
    ("learned", "--rnn-eval-steps", "e", dict(type=COUNT, help="steps of the rnn attack (default: T)")),
    ("learned", "--rnn-fit", "e", dict(type=COUNT, metavar="N", help="--eval-only: the rnn attack's m_phi is a fresh "
                                       "one fitted to the frozen classifier on N training batches (T = --steps)")),
    ("learned", "--l2l-attacker", "tm", dict(default="slim", choices=("slim", "wide"), help="the attacker network")),
    ("learned", "--l2l-width", "tm", dict(type=COUNT, default=128, help="attacker channels W")),
    ("learned", "--l2l-steps", "tm", dict(type=COUNT, default=2, help="l2l-2step: attacker applications K")),
    ("learned", "--l2l-step-size", "tm", dict(type=POSITIVE_NUMBER, help="l2l-2step: k-step's step")),
    ("learned", "--attacker-steps", "t", dict(type=COUNT, default=1, help="attacker updates per classifier update")),
    ("eval", "--eval-attacks", "e", dict(default="fgsm,pgd,cw,aa", help="comma list from: {attacks}")),
    ("eval", "--eval-steps", "e", dict(type=NONNEGATIVE_INT, help="PGD/CW steps (default 20, MNIST 40)")),
    ("eval", "--eval-step-size", "e", dict(type=NONNEGATIVE_NUMBER, help="PGD/CW step (default: eps/4, MNIST 0.01)")),
    ("eval", "--eval-restarts", "e", dict(type=COUNT, default=1, help="random restarts of PGD/CW")),
    ("eval", "--eval-batch-size", "e", dict(type=COUNT, default=500, help="batch of evaluation and validation")),
    ("eval", "--eval-last", "e", dict(action=BOOL, default=True, help="also evaluate last.pt when best.pt is another")),
    ("eval", "--transfer-from", "e", dict(metavar="CKPT", help="source model of the transfer attack")),
    ("eval", "--apgd-steps", "e", dict(type=COUNT, default=100, help="iterations of apgd-ce and apgd-t")),
    ("eval", "--apgd-targets", "e", dict(type=COUNT, default=9, help="target classes of apgd-t")),
    ("eval", "--fab-steps", "e", dict(type=COUNT, default=100, help="iterations of fab-t per target")),
    ("eval", "--fab-targets", "e", dict(type=COUNT, default=9, help="target classes of fab-t")),
    ("eval", "--square-queries", "e", dict(type=COUNT, default=5000, help="queries of square")),
    ("eval", "--val-steps", "t", dict(type=NONNEGATIVE_INT, default=10, help="PGD steps of the per-epoch validation")),
    ("eval", "--val-step-size", "t", dict(type=POSITIVE_NUMBER, help="its step (default: 2.5 eps / K)")),
    ("eval", "--val-restarts", "t", dict(type=COUNT, default=1, help="its random restarts")),
    ("speed", "--precision", "", dict(default="fp32", choices=("fp32", "bf16"), help="training under bf16 autocast")),
    ("speed", "--channels-last", "e", dict(action="store_true", help="NHWC memory format")),
    ("speed", "--compile", "e", dict(action="store_true", help="torch.compile the networks")),
    ("speed", "--benchmark", "", dict(action="store_true", help="time training steps on synthetic data")),
    ("speed", "--bench-steps", "", dict(type=COUNT, default=20, help="timed steps of --benchmark")),
    ("speed", "--bench-warmup", "", dict(type=NONNEGATIVE_INT, default=5, help="untimed steps first")),
)
KEYS = {where: tuple(flag[2:].replace("-", "_") for _, flag, w, _ in FLAGS if where in w) for where in "tme"}


def build_parser(recipe: Optional[dict] = None) -> argparse.ArgumentParser:
    """The command line; with a resolved `recipe` (--method M [--dataset D] --help), --help shows its values."""
    p = OneLineParser(description="Adversarial training with hand-designed and learned attackers. A flag without a "
                      "default below takes its method's and dataset's: python l2l.py --method M --dataset D --help "
                      "shows them.", allow_abbrev=False)
    groups = {key: p.add_argument_group(title) for key, title in FLAG_GROUPS.items()}
    names = dict(methods=", ".join(METHODS), datasets=", ".join(DATASETS), attacks=", ".join(EVAL_ATTACKS))
    choices = {"--method": list(METHODS), "--dataset": list(DATASETS)}
    for group, flag, _, kw in FLAGS:  # --help shows each default once
        text, value = kw["help"].format(**names), (recipe or {}).get(flag[2:].replace("-", "_"))
        if "default" not in kw and value is not None:
            value = fmt_eps(value) if isinstance(value, float) and ("eps" in flag or "step-size" in flag) else value
            text += f" ({recipe['method']} on {recipe['dataset']}: {value})".replace("%", "%%")
        shown = "default" in text or kw.get("default") in (None, False)
        groups[group].add_argument(flag, **dict(kw, help=text if shown else text + " (default: %(default)s)"),
                                   **({"choices": choices[flag]} if flag in choices else {}))
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-method, per-dataset defaults and check what no flag's type can check alone. Raises UsageError."""
    spec = DATASETS[args.dataset]
    recipe = dict(COMMON_DEFAULTS, **METHOD_DEFAULTS[args.method]["mnist" if args.dataset == "mnist" else "cifar"])
    args.eps = spec["eps"] if args.eps is None else args.eps
    if not 1e-4 <= args.eps <= 1:
        raise UsageError(f"--eps {args.eps:g} is outside [1e-4, 1]: pixels are in [0,1]; write e.g. --eps 8/255")
    for name, value in recipe.items():  # the flags left unset (recipe keys that are no flag are read below)
        if getattr(args, name, 0) is None:
            setattr(args, name, value)
    for name, default in DERIVED_DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, default(args, recipe, spec))
    args.input_mean = None
    if args.normalize == "mean-std":
        args.input_mean = list(spec["mean"])
        args.input_std = list(args.input_std or (recipe.get("cifar10_std") if args.dataset == "cifar10" else None)
                              or spec["std"])
        if len(args.input_std) != spec["shape"][0] or min(args.input_std) <= 0:
            raise UsageError(f"--input-std needs {spec['shape'][0]} positive numbers (one a channel): {args.input_std}")
    elif args.input_std is not None:
        raise UsageError("--input-std sets the std of --normalize mean-std; add --normalize mean-std or drop it")
    if args.method in ("pgd-at", "pgd-at-bls", "trades", "rnn-adv", "rnn-trades") and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: {args.method} needs at least one inner step (--method plain trains "
                         f"without an attack)")
    args.lr_milestones = [float(m) for m in args.lr_milestones]
    if not 0 < args.lr_peak_epoch <= args.epochs:
        raise UsageError(f"--lr-peak-epoch {args.lr_peak_epoch:g} is outside (0, --epochs {args.epochs}]")
    if args.method in ("pgd-at", "trades", "fast-at", "fast-at-ga", "rnn-adv", "rnn-trades") and args.steps > 0 and \
            args.step_size == 0 and not args.eval_only:
        raise UsageError(f"--step-size 0: {args.method}'s attack would not move; give e.g. 2/255 (or --steps 0)")
    if args.eval_step_size == 0 and args.eval_steps > 0:
        raise UsageError("--eval-step-size 0: the pgd and cw evaluation attacks would not move; give a positive step")
    names = [a.strip() for a in args.eval_attacks.split(",") if a.strip()]
    unknown = ", ".join(sorted(set(names) - set(EVAL_ATTACKS)))
    if not names or len(set(names)) < len(names) or unknown:
        raise UsageError(f"--eval-attacks '{args.eval_attacks}': " + (f"no attack named {unknown} (AutoAttack is "
                         f"'aa'); " if unknown else "") + f"list each of {', '.join(EVAL_ATTACKS)} at most once")
    args.eval_attacks = ",".join(names)
    args.apgd_targets, args.fab_targets = (min(n, spec["classes"] - 1) for n in (args.apgd_targets, args.fab_targets))
    if args.rnn_fit and not (args.eval_only and "rnn" in names):
        raise UsageError("--rnn-fit fits the m_phi of the rnn attack to a checkpoint: give --eval-only CKPT and "
                         "--eval-attacks ...,rnn")
    for attack, methods in (("rnn", ("rnn-adv", "rnn-trades")), ("l2l", tuple(L2L_VARIANTS))):
        if attack in names and args.method not in methods and not (attack == "rnn" and args.rnn_fit):
            raise UsageError(f"--eval-attacks {attack}: --method {args.method} learns no {attack.upper()} attacker")
    if ("transfer" in names) != (args.transfer_from is not None):
        raise UsageError("--eval-attacks transfer and --transfer-from CKPT go together; give both or neither")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    args.out = args.out or os.path.join("runs", f"{args.method}_{args.dataset}")
    return args


def device_name(device: torch.device) -> str:
    """What results.json and the benchmark record as the machine: the GPU's name, or the CPU and its threads."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


# ================================================================================================
# Data: whole datasets as uint8 tensors on the training device, batches by randperm, augmentation on
# the device (airbench-style, no DataLoader workers); models by name; checkpoints.


def load_arrays(name: str, data_dir: str) -> Dict[str, torch.Tensor]:
    """x_train, y_train, x_test, y_test of a dataset: uint8 N x H x W x C and int64. Read from the cache
    <data_dir>/<name>.npz (numpy's format) when present; otherwise through torchvision, then cached."""
    cache = os.path.join(data_dir, f"{name}.npz")
    if os.path.isfile(data_dir):
        raise UsageError(f"--data-dir {data_dir} is a file: give the folder that holds {name}.npz or its files")
    if os.path.exists(cache):
        try:
            with np.load(cache) as f:
                arrays = {k: torch.from_numpy(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
        except Exception as e:  # numpy's errors for a truncated, foreign or incomplete file
            raise UsageError(f"cannot read the dataset cache {cache} ({type(e).__name__}); delete it and rerun")
    else:
        import torchvision.datasets as tvd
        made = [d for d in (data_dir, os.path.join(data_dir, name.upper()), os.path.join(data_dir, name.upper(), "raw"))
                if not os.path.exists(d)]  # what torchvision may create; a failed load removes it again if empty
        try:
            arrays = {}
            for split, train in (("train", True), ("test", False)):
                if name == "svhn":  # stores N x C x H x W
                    ds = tvd.SVHN(data_dir, split=split, download=True)
                    x, y = torch.as_tensor(ds.data).permute(0, 2, 3, 1), ds.labels
                else:
                    ds = getattr(tvd, name.upper())(data_dir, train=train, download=True)
                    x, y = torch.as_tensor(ds.data), ds.targets
                arrays[f"x_{split}"] = (x[..., None] if x.dim() == 3 else x).contiguous()
                arrays[f"y_{split}"] = torch.as_tensor(y).long()
        except Exception as e:  # offline download, missing files, wrong checksums ...
            for d in reversed(made):
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
            hint = {"mnist": f"{data_dir}/MNIST/raw/ (the four original .gz files), or {cache}",
                    "cifar100": f"{data_dir}/cifar-100-python.tar.gz, or {cache}",
                    "svhn": f"{data_dir}/train_32x32.mat and test_32x32.mat, or {cache}"}.get(
                name, f"{cache} (arrays x_train, y_train, x_test, y_test)")
            raise UsageError(f"dataset '{name}' is not in --data-dir {data_dir} and could not be downloaded "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); put {hint} there")
        if os.access(data_dir, os.W_OK):  # a read-only --data-dir is read each time, not cached
            np.savez(cache + ".tmp.npz", **{k: v.numpy() for k, v in arrays.items()})  # then renamed: never half a file
            os.replace(cache + ".tmp.npz", cache)
    return {k: v.long() if k.startswith("y") else v for k, v in arrays.items()}


# Train / validation / test splits as uint8 N x C x H x W tensors and int64 labels on one device.
Data = namedtuple("Data", "x_train y_train x_val y_val x_test y_test")


def load_data(args, device: torch.device, test_only: bool = False) -> Data:
    """Validation = the last --val-size training examples (Fast-BAT holds out the last 10%), train = the first
    --train-size of the rest, test = the first --test-size test examples; --eval-only (test_only): the test set only."""
    rank, world = dist_world()
    if rank > 0:  # under torchrun rank 0 reads first (and, online, downloads and writes the cache), the others after
        dist.barrier()
    arrays = load_arrays(args.dataset, args.data_dir)
    if world > 1 and rank == 0:
        dist.barrier()
    n, n_test = arrays["x_train"].shape[0], min(arrays["x_test"].shape[0], args.test_size or math.inf)
    val_size = 0 if test_only else args.val_size
    n_train = 0 if test_only else n - val_size if args.train_size is None else args.train_size
    if not test_only and (val_size >= n or n_train + val_size > n):
        raise UsageError(f"--train-size {n_train} plus --val-size {args.val_size} leave none of the {n} to train on")
    dev = lambda x: x.permute(0, 3, 1, 2).contiguous().to(device)  # N x H x W x C on the host -> N x C x H x W
    return Data(dev(arrays["x_train"][:n_train]), arrays["y_train"][:n_train].to(device),
                dev(arrays["x_train"][n - val_size:]), arrays["y_train"][n - val_size:].to(device),
                dev(arrays["x_test"][:n_test]), arrays["y_test"][:n_test].to(device))


def to_float(x_uint8: torch.Tensor, fmt: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """uint8 images -> floats in [0,1], in memory format fmt (default: the input's), in one copy."""
    return x_uint8.to(torch.float32, memory_format=fmt).div_(255)


def augment(x: torch.Tensor, mode: str, gen: torch.Generator, pad: str = "zero") -> torch.Tensor:
    """Per image, on the device, as torchvision's RandomCrop(32, 4), RandomHorizontalFlip(), RandomRotation(15): a crop
    padded by 4 (zeros, or mirrored as Rice et al.'s utils.pad), a flip ('crop-flip*'), and for 'crop-flip-rotate' (as
    Fast-BAT's CIFAR-100 loader) a rotation by U(-15, 15) degrees about the centre, nearest pixel, zero fill."""
    if mode == "none":
        return x
    (n, c, h, w), d = x.shape, x.device
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect" if pad == "reflect" else "constant")
    dy, dx = [torch.randint(0, 9, (n,), device=d, generator=gen) for _ in range(2)]  # dy drawn first
    rows = (dy[:, None] + torch.arange(h, device=d))[:, None, :, None]  # n x 1 x h x 1
    cols = (dx[:, None] + torch.arange(w, device=d))[:, None, None, :]  # n x 1 x 1 x w
    x = padded[torch.arange(n, device=d)[:, None, None, None], torch.arange(c, device=d)[None, :, None, None],
               rows, cols]
    if mode in ("crop-flip", "crop-flip-rotate"):
        flip = torch.rand(n, device=d, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mode == "crop-flip-rotate":
        angle = (torch.rand(n, device=d, generator=gen) * 2 - 1) * math.radians(15)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)  # n x 2 x 3, about the centre
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = False, min_last: int = 2) -> int:
    """The full batches of n examples and the last partial one, as the official DataLoaders keep it, unless
    drop_last or it has fewer than min_last examples (one gives BatchNorm no statistics; every process needs one)."""
    bs = min(batch_size, n)
    return n // bs + (0 if drop_last or n % bs < max(min_last, 1) else 1)


def train_batches(data: Data, batch_size: int, mode: str, gen: torch.Generator, drop_last: bool = False,
                  pad: str = "zero", min_last: int = 2):
    """One epoch of augmented (x, y) float batches in [0,1] in the order of a fresh randperm."""
    n = data.x_train.shape[0]
    bs, perm = min(batch_size, n), torch.randperm(n, device=data.x_train.device, generator=gen)
    for i in range(batches_per_epoch(n, batch_size, drop_last, min_last)):
        idx = perm[i * bs:(i + 1) * bs]
        yield augment(to_float(data.x_train[idx]), mode, gen, pad), data.y_train[idx]


def build_model(name: str, dataset: str, depth: int = 34, width: Optional[int] = None, mean=None, std=None,
                preact_shortcut: str = "input") -> nn.Module:
    """Normalize(mean, std) (the identity without them) followed by the named network, sized for the dataset; width:
    WideResNet's widen factor (10) or PreActResNet-18's base width (64)."""
    (c, h, _), k = DATASETS[dataset]["shape"], DATASETS[dataset]["classes"]
    net = {"smallcnn": lambda: SmallCNN(c, k, h), "mnistnet": lambda: MNISTNet(c, k, h), "vgg16": lambda: VGG16(c, k),
           "preactresnet18": lambda: PreActResNet18(c, k, preact_shortcut, width or 64),
           "wrn": lambda: WideResNet(c, k, depth, width or 10)}[name]()
    return nn.Sequential(Normalize(mean or (0.0,) * c, std or (1.0,) * c), net)


CHECKPOINT_FORMAT = "l2l-checkpoint-3"


def read_checkpoint(path: str, what: str) -> dict:
    """torch.load (tensors and plain values only), with a one-line UsageError for a missing or foreign file."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder: pass a checkpoint in it, e.g. {os.path.join(path, 'best.pt')} "
                         f"or last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch.save archive, a damaged one, or objects beyond tensors and plain values
        raise UsageError(f"{what} {path} is not a readable checkpoint ({type(e).__name__}); pass an l2l.py run's .pt")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{what} {path} is not a checkpoint of this l2l.py (no '{CHECKPOINT_FORMAT}'); pass a run's")
    return ckpt


def load_model(ckpt, device="cpu") -> nn.Module:
    """The classifier of an l2l.py checkpoint (a path or a read one), in eval mode, for [0,1] inputs: any attack's."""
    ckpt = read_checkpoint(ckpt, "checkpoint") if isinstance(ckpt, str) else ckpt
    a = ckpt["args"]
    model = build_model(a["model"], a["dataset"], a["depth"], a["width"], preact_shortcut=a["preact_shortcut"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()  # the first layer's mean and std came with the weights


# ================================================================================================
# Methods: each training step of Part I with the flags bound to its keywords (the one place where a
# flag meets an algorithm), the learned networks it takes, and how they are built.


# The classifier, its optimiser, the flags, and the method's learned networks and their optimisers (`extras`).
Run = namedtuple("Run", "model optimizer args extras")


def run_networks(run: Run) -> list:
    """The classifier and every learned network (attacker, RNN optimiser) of the run."""
    return [run.model] + [v for v in run.extras.values() if isinstance(v, nn.Module)]


def setup_l2l(args) -> dict:
    """The L2L attacker g(.; phi) (its input: the image, and but for naive L2L its gradient) and its optimiser."""
    c = DATASETS[args.dataset]["shape"][0]
    in_ch = c if L2L_VARIANTS[args.method] == "naive" else 2 * c
    attacker = {"slim": SlimAttacker, "wide": WideAttacker}[args.l2l_attacker](in_ch, c, args.eps, args.l2l_width)
    return {"attacker": attacker, "attacker_opt": l2l_attacker_optimizer(attacker)}


def setup_rnn(args) -> dict:
    """m_phi (--rnn-design) and its Adam. Which of Algorithm 1's alpha1/alpha2 belongs to phi is not stated in what
    could be read: here alpha1 = --lr is theta's, alpha2 phi's (rnn_optimizer_adam)."""
    rnn = LSTMOptimizer(args.rnn_hidden or 20) if args.rnn_design == "lstm" else SignStepRNN(args.rnn_hidden or 8)
    return {"rnn": rnn, "rnn_opt": rnn_optimizer_adam(rnn)}


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """L2L's batch max under torchrun: a training batch is the global one, so the max is over every rank's shard."""
    if dist_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def l2l_variant(a) -> str:
    """naive, grad, multi, or (l2l-2step with --l2l-step-size) adv_loss.py's k-step variant."""
    return "k-step" if L2L_VARIANTS[a.method] == "multi" and a.l2l_step_size is not None else L2L_VARIANTS[a.method]


def rnn_run_attack(args, rnn, model, x, y, steps, learn):
    """m_phi's attack with the run's flags and the method's inner loss (RNN-Adv: CE; RNN-TRADES: KL to the clean
    output), for `steps` steps (evaluation: --rnn-eval-steps; the step feature t/T counts T = `steps`)."""
    return rnn_attack(rnn, model, x, y, args.eps, steps, args.step_size, args.attack_start, args.method == "rnn-trades",
                      args.rnn_weights, learn, horizon=steps, per_example=args.rnn_objective == "per-example")


def attack_keywords(a) -> dict:
    return dict(eps=a.eps, step_size=a.step_size, steps=a.steps, start=a.attack_start, attack_bn=a.attack_bn)


def rnn_keywords(a) -> dict:
    return dict(eps=a.eps, steps=a.steps, alpha=a.step_size, start=a.attack_start, weights=a.rnn_weights,
                per_example=a.rnn_objective == "per-example", attack_bn=a.attack_bn)


def l2l_keywords(a) -> dict:
    return dict(eps=a.eps, variant=l2l_variant(a), steps=a.l2l_steps, step_size=a.l2l_step_size,
                attacker_steps=a.attacker_steps, batch_max=max_over_ranks)


# A method: its training step of Part I, the paper, keywords(args) -> the step's keyword arguments, the learned networks
# and optimisers (keys of Run.extras) the step takes before x, y, and setup(args) -> those (build_run moves them).
Method = namedtuple("Method", "step paper keywords networks setup", defaults=(lambda a: {}, (), None))


METHODS: Dict[str, Method] = {
    "plain": Method(plain_step, "standard training"),
    "pgd-at": Method(pgd_at_step, "Madry et al. 2018, eq. 2.1", attack_keywords),
    "trades": Method(trades_step, "Zhang et al. 2019, Algorithm 1", lambda a: dict(attack_keywords(a), beta=a.beta)),
    "fast-at": Method(fast_at_step, "Wong et al. 2020, Algorithm 3", lambda a: dict(
        eps=a.eps, step_size=a.step_size, attack_bn=a.attack_bn, clamp_start=a.clamp_start)),
    "fast-at-ga": Method(fast_at_ga_step, "Andriushchenko & Flammarion 2020, GradAlign",
                         lambda a: dict(eps=a.eps, step_size=a.step_size, attack_bn=a.attack_bn)),
    "fast-bat": Method(fast_bat_step, "Zhang et al. 2022, eq. 9, 13, 14",
                       lambda a: dict(eps=a.eps, attack_bn=a.attack_bn)),
    "pgd-at-bls": Method(pgd_at_bls_step, "Xiong & Hsieh 2020, Table 1 AdvTrain+BLS",
                         lambda a: dict(eps=a.eps, steps=a.steps, start=a.attack_start, attack_bn=a.attack_bn)),
    "rnn-adv": Method(rnn_adv_step, "Xiong & Hsieh 2020, Algorithm 1 with PGD-AT's loss", rnn_keywords,
                      ("rnn", "rnn_opt"), setup_rnn),
    "rnn-trades": Method(rnn_trades_step, "Xiong & Hsieh 2020, Algorithm 1 with TRADES' loss",
                         lambda a: dict(rnn_keywords(a), beta=a.beta), ("rnn", "rnn_opt"), setup_rnn),
}
for _name, _paper in (("l2l-naive", "naive L2L"), ("l2l-grad", "gradient L2L"),
                      ("l2l-2step", "multi-step gradient L2L")):
    METHODS[_name] = Method(l2l_step, f"Jiang et al. 2021, {_paper}", l2l_keywords, ("attacker", "attacker_opt"),
                            setup_l2l)


# ================================================================================================
# Speed and scale. None of this changes an algorithm: every trainer runs as written, on its share
# of the batch, in the precision asked for; gradients are averaged across processes before a step.

def memory_format(args) -> torch.memory_format:
    return torch.channels_last if args.channels_last else torch.contiguous_format


def training_step(run: Run, x, y):
    """The method's step on (x, y) with the run's networks and flags (under torchrun on this rank's shard of the global
    batch; shards of a last partial batch may differ by one example), in the chosen memory format and precision."""
    rank, world = dist_world()
    if world > 1:
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    x, method = x.contiguous(memory_format=memory_format(run.args)), METHODS[run.args.method]
    # bf16 autocast: convolutions and matmuls in bf16, losses and softmax in fp32; bf16 has fp32's range, so no loss
    # scaling, and the double backward of Fast-BAT and GradAlign needs nothing special
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=run.args.precision == "bf16"):
        return method.step(run.model, run.optimizer, *[run.extras[k] for k in method.networks], x, y,
                           **method.keywords(run.args))


def compile_networks(run: Run) -> None:
    """--compile: every network under torch.compile, static shapes, in place (state_dict keys unchanged)."""
    if run.args.method in ("fast-bat", "fast-at-ga"):  # a backward through a backward (create_graph)
        print(f"note: torch.compile cannot run {run.args.method}'s double backward; running eager", file=sys.stderr)
        run.args.compile = False  # logs and results.json say what ran
        return
    for net in run_networks(run):
        net.compile(dynamic=False)


def dist_world() -> tuple:
    """(rank, number of processes): (0, 1) unless torchrun started this process and the group is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_process(args) -> torch.device:
    """The device of this process, torch seeded with --seed, CUDA's convolutions autotuned (fixed shapes) and fp32
    without TF32 (bf16 is the fast path). Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, one
    GPU per rank by LOCAL_RANK; gloo on CPU). --batch-size stays the global batch and is split over ranks."""
    torch.manual_seed(args.seed)
    cudnn = torch.backends.cudnn
    cudnn.benchmark, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return device
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes; use a multiple")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def make_data_parallel(run: Run) -> None:
    """Data parallelism over torchrun's processes. DDP reduces gradients only as backward() accumulates them, while
    L2L, the RNN optimiser and Fast-BAT use torch.autograd.grad or a double backward; so rank 0's weights are broadcast
    once and every optimiser averages its gradients and BN running statistics over ranks just before it steps."""
    if dist_world()[1] == 1:
        return
    nets = run_networks(run)
    for net in nets:
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, 0)
    for opt in [run.optimizer] + [v for v in run.extras.values() if isinstance(v, torch.optim.Optimizer)]:
        params = {id(p) for group in opt.param_groups for p in group["params"]}
        owners = [net for net in nets if any(id(p) in params for p in net.parameters())]
        stats = [b for net in owners for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.track_running_stats for b in (m.running_mean, m.running_var)]

        def average(optimizer, _args, _kwargs, stats=stats):
            tensors = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            flat = torch.cat([t.reshape(-1) for t in tensors + stats])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for t, part in zip(tensors + stats, flat.split([t.numel() for t in tensors + stats])):
                t.copy_(part.view_as(t))

        opt.register_step_pre_hook(average)


def shard(n: int, pad: bool, align: int = 1) -> torch.Tensor:
    """This rank's indices of n examples: a block of ceil(n / ranks) rounded up to a multiple of `align`; with pad,
    every rank gets that many (repeating example n - 1), so all ranks run the same batches and collectives."""
    rank, world = dist_world()
    per = -(-(-(-n // world)) // align) * align
    idx = torch.arange(rank * per, (rank + 1) * per, device="cpu")  # on the host; callers move it
    return idx.clamp(max=n - 1) if pad else idx[idx < n]


def gather_examples(t: torch.Tensor, n: int) -> torch.Tensor:
    """The per-example results of every rank's padded shard (see shard), in example order, first n."""
    if dist_world()[1] == 1:
        return t[:n]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)[:n]


def all_reduce_sum(values: list, device: torch.device) -> list:
    """Sums over ranks of numbers or device scalars (epoch statistics, validation counts), as floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist_world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


duration = lambda seconds: str(datetime.timedelta(seconds=round(seconds)))  # 1 day, 2:03:04


class Ticker:
    """A progress line for a loop of `total` units, at most every `every` seconds: the count, the rate in units per
    second and the time left (`at_most`: total is an upper bound), plus `later(rate)` seconds expected after this loop
    (a run's remaining epochs). Counting reads no device value (no host-device synchronisation)."""

    def __init__(self, what: str, total: int, enabled: bool = True, every: float = 10.0, clock=time.monotonic,
                 unit: str = "batches", later: Optional[Callable[[float], float]] = None, at_most: bool = False):
        self.what, self.total, self.enabled, self.every, self.clock = what, total, enabled, every, clock
        self.unit, self.later, self.at_most, self.done, self.start = unit, later, at_most, 0, clock()
        self.last = self.start

    def step(self, n: int = 1, what: Optional[str] = None) -> None:
        self.done, self.what, now = self.done + n, what or self.what, self.clock()
        if self.enabled and now - self.last >= self.every and self.done:
            rate = self.done / (now - self.start)
            left = max(self.total - self.done, 0) / rate
            print(f"  {self.what}: {self.done:,}/{self.total:,} {self.unit}, "
                  f"{f'{rate:.3g}' if rate < 100 else f'{rate:,.0f}'} {self.unit}/s, "
                  f"{'at most ' * self.at_most}{duration(left)} left" +
                  (f" (whole run: {duration(left + self.later(rate))} left)" if self.later else ""), flush=True)
            self.last = now


# ================================================================================================
# Evaluation: model in eval mode, fixed test subset (the first --test-size examples), every attack's
# robust accuracy and the per-example worst case, with the protocol beside every number.


@contextlib.contextmanager
def exact_fp32():
    """Evaluation and validation on CUDA: float32 without TF32 (cuDNN allows it by default) and without autotuning (the
    shapes change with every subset, and a fresh --eval-only could pick other kernels); the settings restored after."""
    b = torch.backends
    saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = b.cudnn.benchmark = False
    try:
        yield
    finally:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark = saved


# An evaluation attack: run(model, x, y, args, extras) -> x_adv, and protocol(args) -> dict for the results.
EvalAttack = namedtuple("EvalAttack", "run protocol")


def protocol(loss: str, steps, step_size, restarts=1, random_start=True, **more) -> dict:
    return dict(loss=loss, steps=steps, step_size=step_size, restarts=restarts, random_start=random_start, **more)


def autoattack_protocol(args) -> dict:
    """The protocol of --eval-attacks aa: AutoAttack's standard version (9 targets, or classes - 1) or custom."""
    settings = (f"apgd-ce {args.apgd_steps} iterations, apgd-t {args.apgd_targets} targets x {args.apgd_steps}, "
                f"fab-t {args.fab_targets} targets x {args.fab_steps}, square {args.square_queries} queries")
    standard = (args.apgd_steps, args.fab_steps, args.square_queries) == (100, 100, 5000) and \
        args.apgd_targets == args.fab_targets == min(9, DATASETS[args.dataset]["classes"] - 1)
    return protocol("AutoAttack (standard)" if standard else f"AutoAttack (custom: {settings})", args.apgd_steps,
                    2 * args.eps, suite=list(AUTOATTACK_STANDARD), seed=args.seed, settings=settings)


def eval_pgd(loss: str, text: str, transfer: bool = False) -> EvalAttack:
    """PGD with the evaluation flags, keeping per example any iterate that fools the model (never weaker than the last
    one); transfer: on --transfer-from's classifier, whose logits are not the evaluated model's, the last iterate."""
    return EvalAttack(lambda m, x, y, a, e: pgd(e["transfer_source"] if transfer else m, x, y, a.eps, a.eval_step_size,
                                                a.eval_steps, a.eval_restarts, loss, keep_fooling=not transfer),
                      lambda a: protocol(text, a.eval_steps, a.eval_step_size, a.eval_restarts, **(
                          {"source": a.transfer_from and os.path.abspath(a.transfer_from)} if transfer else {})))


EVAL_ATTACKS: Dict[str, EvalAttack] = {
    "fgsm": EvalAttack(lambda m, x, y, a, e: fgsm(m, x, y, a.eps), lambda a: protocol("ce", 1, a.eps, 1, False)),
    "pgd": eval_pgd("ce", "ce"),
    "cw": eval_pgd("cw", "cw margin (PGD under l_inf, not CW-L2)"),
    # The optimisation-based Carlini-Wagner l_inf attack of the official L2L cw.py (the L2L tables' "CW" column).
    "cw-linf": EvalAttack(lambda m, x, y, a, e: cw_linf(m, x, y, a.eps), lambda a: protocol(
        "cw-linf (Carlini-Wagner, as L2L cw.py: Adam 5e-3, c 1e-5 x10 to 1e2, tau x0.9)", 50, 5e-3, 1, False)),
    # AutoAttack's four attacks (Croce & Hein 2020), each also usable alone, one run each as its standard version.
    "apgd-ce": EvalAttack(lambda m, x, y, a, e: apgd_ce(m, x, y, a.eps, a.apgd_steps),
                          lambda a: protocol("ce (APGD)", a.apgd_steps, 2 * a.eps)),
    "apgd-t": EvalAttack(lambda m, x, y, a, e: apgd_targeted(m, x, y, a.eps, a.apgd_steps, a.apgd_targets),
                         lambda a: protocol(f"targeted dlr (APGD-T, {a.apgd_targets} targets)", a.apgd_steps,
                                            2 * a.eps, targets=a.apgd_targets)),
    "fab-t": EvalAttack(lambda m, x, y, a, e: fab_targeted(m, x, y, a.eps, a.fab_steps, a.fab_targets),
                        lambda a: protocol(f"fab-t (targeted FAB, {a.fab_targets} targets, minimal l_inf)", a.fab_steps,
                                           None, 1, False, targets=a.fab_targets)),
    "square": EvalAttack(lambda m, x, y, a, e: square_linf(m, x, y, a.eps, a.square_queries),
                         lambda a: protocol("margin (Square, score-based, p_init 0.8)", a.square_queries, 2 * a.eps)),
    # AutoAttack, standard version: the four above in order, each on the examples still robust; evaluate() runs it
    # over the whole test set at once, in chunks of --eval-batch-size, as autoattack.py does.
    "aa": EvalAttack(lambda m, x, y, a, e: run_autoattack(m, x, y, a)[0], autoattack_protocol),
    # The checkpoint's learned L2L attacker in eval mode, and its learned RNN optimiser for --rnn-eval-steps (Table 6
    # of Xiong & Hsieh: more steps than trained with).
    "l2l": EvalAttack(lambda m, x, y, a, e: eval_learned_l2l(m, x, y, a, e), lambda a: protocol(
        "ce (learned L2L attacker)", a.l2l_steps if L2L_VARIANTS.get(a.method) == "multi" else 1, a.eps, 1, False)),
    "rnn": EvalAttack(lambda m, x, y, a, e: rnn_run_attack(a, e["rnn"], m, x, y, a.rnn_eval_steps, learn=False)[0],
                      lambda a: protocol(f"{'kl' if a.method == 'rnn-trades' else 'ce'} (learned RNN optimiser)",
                                         a.rnn_eval_steps, a.step_size, fitted_batches=a.rnn_fit, trained_steps=a.steps,
                                         design=a.rnn_design, hidden=a.rnn_hidden, weights=a.rnn_weights,
                                         objective=a.rnn_objective)),
    # Black-box transfer (Xiong & Hsieh Table 7): PGD with the evaluation settings on --transfer-from's classifier.
    "transfer": eval_pgd("ce", "ce on the source model (transfer)", transfer=True),
}


def run_autoattack(model, x, y, args, on_batch=None) -> tuple:
    """autoattack() with the evaluation flags: chunks of --eval-batch-size, seeded with --seed."""
    return autoattack(model, x, y, args.eps, AUTOATTACK_STANDARD, args.eval_batch_size, args.seed, args.apgd_steps,
                      args.apgd_targets, args.fab_steps, args.fab_targets, args.square_queries, on_batch)


def eval_learned_l2l(model, x, y, args, extras):
    """The learned attacker in eval mode on chunks of B = --batch-size from x's start: its gradient feature is scaled by
    one max per chunk (adv_loss.py), as in training. evaluate() runs it on the whole test shard, aligned to B, so the
    result depends neither on --eval-batch-size nor on the number of processes."""
    attacker = extras["attacker"]
    with ModelMode(attacker, "eval"), torch.no_grad():
        return torch.cat([l2l_perturb(attacker, model, xc, yc, args.eps, l2l_variant(args), args.l2l_steps,
                                      args.l2l_step_size)
                          for xc, yc in zip(x.split(args.batch_size), y.split(args.batch_size))])


def eval_passes(a) -> dict:
    """Images per example that each evaluation attack sends through the network, at most (cw-linf: a guess)."""
    pgd = a.eval_restarts * (a.eval_steps + 1) + 1
    passes = {"clean": 1, "fgsm": 2, "pgd": pgd, "cw": pgd, "cw-linf": 400, "transfer": 1, "l2l": a.l2l_steps + 2,
              "rnn": a.rnn_eval_steps + 2, "apgd-ce": a.apgd_steps + 2, "apgd-t": a.apgd_targets * (a.apgd_steps + 2),
              "fab-t": a.fab_targets * (2 * a.fab_steps + 2), "square": a.square_queries + 2}
    return dict(passes, aa=1 + sum(passes[k] for k in AUTOATTACK_STANDARD))


@exact_fp32()
def evaluate(model, x_uint8, y, args, attacks, extras=None) -> dict:
    """Clean accuracy, each attack's robust accuracy, the per-example worst case over all of them, and each attack's
    largest l_inf perturbation (a check of the constraint), seeded by --seed (seed + rank on each rank's shard under
    torchrun). 'aa' runs last over the whole set, as autoattack.py, reseeded before every chunk, and records how many
    examples each of its attacks left."""
    rank, world = dist_world()
    torch.manual_seed(args.seed + rank)
    model.eval()
    n = x_uint8.shape[0]
    idx = shard(n, pad=True, align=args.batch_size if "l2l" in attacks else 1).to(x_uint8.device)
    xs, ys = x_uint8[idx], y[idx]
    per_batch = [name for name in attacks if name not in ("aa", "l2l")]  # the two run over the whole shard
    correct, losses = {name: [] for name in ["clean"] + per_batch}, {name: [] for name in ["clean"] + per_batch}
    max_pert = {name: torch.zeros((), device=x_uint8.device) for name in attacks}
    passes = eval_passes(args)  # the progress line counts the images each attack sends through the network
    ticker = Ticker("evaluating", xs.shape[0] * sum(passes[k] for k in ["clean", *attacks]),
                    rank == 0 and not args.quiet, unit="image passes", at_most=True)

    def autoattack_stage(name, left):  # a new stage of AutoAttack: plan for the examples it starts on
        if ticker.what != f"AutoAttack: {name}":
            ticker.what = f"AutoAttack: {name}"
            ticker.total = ticker.done + left * sum(passes[k] for k in AUTOATTACK_STANDARD[AUTOATTACK_STANDARD.index(
                name):])

    count = torch.compiler.disable(lambda module, inputs, output: ticker.step(inputs[0].shape[0]))  # outside compile
    with model.register_forward_hook(count):
        for i in range(0, xs.shape[0], args.eval_batch_size):
            x = to_float(xs[i:i + args.eval_batch_size], memory_format(args))
            yb = ys[i:i + args.eval_batch_size]
            for name in ["clean"] + per_batch:
                ticker.what = f"evaluating {name}"
                x_adv = x if name == "clean" else EVAL_ATTACKS[name].run(model, x, yb, args, extras)
                if name != "clean":
                    max_pert[name] = torch.maximum(max_pert[name], (x_adv - x).abs().amax())
                with torch.no_grad():
                    logits = model(x_adv)
                correct[name].append(logits.argmax(1) == yb)
                losses[name].append(F.cross_entropy(logits.float(), yb, reduction="sum"))
        whole = [a for a in ("l2l", "aa") if a in attacks]  # over the whole shard; l2l's chunks of --batch-size start
        x = to_float(xs, memory_format(args)) if whole else None  # at its aligned start: by global example index
        for name in whole:
            ticker.what = f"evaluating {name}"
            if name == "l2l":
                x_adv = EVAL_ATTACKS["l2l"].run(model, x, ys, args, extras)
                with torch.no_grad():
                    correct["l2l"] = [model(xb).argmax(1) == yb for xb, yb in
                                      zip(x_adv.split(args.eval_batch_size), ys.split(args.eval_batch_size))]
            else:
                x_adv, robust = run_autoattack(model, x, ys, args, autoattack_stage)
                correct["aa"] = [robust[AUTOATTACK_STANDARD[-1]]]
            max_pert[name] = (x_adv - x).abs().amax()
    correct = {k: gather_examples(torch.cat(v).to(torch.uint8), n).bool() for k, v in correct.items()}
    # the inner loss each attack reached: mean CE over the shard's examples (the padding of uneven shards included)
    mean_loss = dict(zip(losses, all_reduce_sum([sum(v) for v in losses.values()], x_uint8.device)))
    if world > 1:
        for value in max_pert.values():
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
    worst = torch.stack(list(correct.values())).all(0)
    digits = len(str(n)) + 3  # 1/1000 of the resolution 1/n: no float32 noise in results.json (k/32 stays exact)
    accuracy = lambda flags: round(int(flags.sum()) / n, digits)
    results = {"protocol": {"eps": args.eps, "eps_text": fmt_eps(args.eps), "examples": n, "split": "test",
                            "model_mode": "eval", "precision": "fp32", "processes": world},
               "clean": {"accuracy": accuracy(correct["clean"])}}
    for name in attacks:
        results[name] = dict(accuracy=accuracy(correct[name]), **EVAL_ATTACKS[name].protocol(args),
                             max_perturbation=max_pert[name].item())
    for name, value in mean_loss.items():
        results[name]["mean_loss"] = round(float(value) / xs.shape[0] / world, 6)
    for name, flags in dict(correct, worst_case=worst).items():  # per test image, for paired comparisons
        results.setdefault(name, {})["correct"] = "".join("01"[int(c)] for c in flags.tolist())
    if "aa" in attacks:
        left = {k: gather_examples(robust[k].to(torch.uint8), n).bool() for k in AUTOATTACK_STANDARD}
        results["aa"]["robust_after"] = {k: {"accuracy": accuracy(v), "robust": int(v.sum())} for k, v in left.items()}
    results["worst_case"].update(accuracy=accuracy(worst), over=["clean"] + list(attacks))
    return results


def masking_warnings(res: dict, gap: float = 0.05) -> list:
    """One line for every gradient-based attack whose robust accuracy AutoAttack undercuts by more than `gap`: that
    figure overstates robustness (a sign of gradient masking, Athalye et al. 2018; Croce & Hein 2020)."""
    if "aa" not in res:
        return []
    aa = res["aa"]["accuracy"]
    return [f"WARNING: {name} leaves {100 * res[name]['accuracy']:.2f}% but AutoAttack {100 * aa:.2f}%: the {name} "
            f"figure overstates robustness (possible gradient masking); report AutoAttack's"
            for name in ("fgsm", "pgd", "cw", "cw-linf", "l2l", "rnn")
            if name in res and res[name]["accuracy"] > aa + gap]


def format_results(res: dict, title: str) -> str:
    """The results as a table, protocol beside each number, AutoAttack's attacks under its row, masking warnings."""
    p = res["protocol"]
    lines = [f"{title}: eps {p['eps_text']}, {p['examples']} {p['split']} examples, model in eval mode, "
             f"{p['precision']}", f"  {'attack':<12}{'accuracy':>9}  {'loss':<9}{'steps':>6}{'step':>9}{'restarts':>9}",
             f"  {'clean':<12}{100 * res['clean']['accuracy']:>8.2f}%"]
    for name in res["worst_case"]["over"][1:]:
        r = res[name]
        if name == "aa":
            lines.append(f"  {'aa':<12}{100 * r['accuracy']:>8.2f}%  {r['loss']}, seed {r['seed']}")
            lines.append(" " * 16 + ", ".join(f"after {k} {100 * v['accuracy']:.2f}%"
                                              for k, v in r["robust_after"].items()))
            continue
        step = fmt_eps(r["step_size"]) if r.get("step_size") else "-"
        lines.append(f"  {name:<12}{100 * r['accuracy']:>8.2f}%  {r['loss'].split()[0]:<9}{r['steps']:>6}"
                     f"{step:>9}{r['restarts']:>9}" + (f"  ({r['targets']} targets)" if "targets" in r else ""))
    lines.append(f"  {'worst case':<12}{100 * res['worst_case']['accuracy']:>8.2f}%  "
                 f"(per example, over {', '.join(res['worst_case']['over'])})")
    lines += ["  " + w for w in masking_warnings(res)]
    if "aa" not in res and len(res["worst_case"]["over"]) > 1:
        lines.append("  note: no AutoAttack in this evaluation: these robust accuracies are upper bounds that stronger "
                     "attacks may lower (add aa to --eval-attacks)")
    return "\n".join(lines)


@exact_fp32()
def validate(model, data: Data, args) -> tuple:
    """(clean, robust) accuracy on the validation split, eval mode, for choosing best.pt: PGD-K-R (--val-steps K,
    --val-restarts R; Fast-BAT selects on PGD-50-10, step eps/4), keeping any fooling iterate; K = 0: clean."""
    model.eval()
    idx = shard(data.x_val.shape[0], pad=False).to(data.x_val.device)
    xs, ys = data.x_val[idx], data.y_val[idx]
    clean = robust = torch.zeros((), device=xs.device)
    ticker = Ticker(f"validation (PGD-{args.val_steps})", -(-xs.shape[0] // args.eval_batch_size),
                    dist_world()[0] == 0 and not args.quiet)
    for i in range(0, xs.shape[0], args.eval_batch_size):
        x = to_float(xs[i:i + args.eval_batch_size], memory_format(args))
        y = ys[i:i + args.eval_batch_size]
        with torch.no_grad():
            clean = clean + (model(x).argmax(1) == y).sum()
        if args.val_steps:
            x = pgd(model, x, y, args.eps, args.val_step_size, args.val_steps, args.val_restarts, keep_fooling=True)
            with torch.no_grad():
                robust = robust + (model(x).argmax(1) == y).sum()
        ticker.step()
    clean, robust = all_reduce_sum([clean, robust], xs.device)
    return clean / len(data.x_val), (robust if args.val_steps else clean) / len(data.x_val)


# ================================================================================================
# Training loop: per-iteration lr schedule, per-epoch log line, atomic checkpoints, exact resume.


def schedule_at(args, it: int, iters_per_epoch: int) -> tuple:
    """(learning rate, SGD momentum) for iteration `it`, set every iteration as fast_adversarial and Fast-BAT do.
    multistep: lr x0.1 at each --lr-milestones epoch m (--lr-milestone-base 1: during epoch m, counted from 1; 0: after
    m full epochs, as MultiStepLR); cyclic: torch's CyclicLR, one triangle 0 -> --lr at --lr-peak-epoch -> 0, momentum
    --momentum -> 0.8 at the peak (CyclicLR's default base_momentum, which fast_adversarial and Fast-BAT inherit), in
    closed form (CyclicLR's arithmetic differs in the last bits)."""
    t = it / iters_per_epoch
    if args.lr_schedule == "multistep":
        return args.lr * 0.1 ** sum(t >= m - args.lr_milestone_base for m in args.lr_milestones), args.momentum
    if args.lr_schedule == "cyclic":
        peak = args.lr_peak_epoch
        scale = t / peak if t <= peak else max(0.0, (args.epochs - t) / (args.epochs - peak))
        return args.lr * scale, args.momentum - (args.momentum - 0.8) * scale  # (Adam has no momentum to set)
    return args.lr, args.momentum


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(<path>.tmp), then rename it over `path`: a kill never leaves a half-written file under the real name."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_results(results: dict, out: str) -> None:
    atomic_write(os.path.join(out, "results.json"), lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))


_HELD: Dict[str, tuple] = {}  # the --out folders this process holds -> (descriptor, whether this process made it)


def prepare_out_dir(out: str, files: tuple, allow: bool) -> list:
    """Rank 0 creates --out and holds it (an flock, which the OS releases however the process ends): a second run into
    it is refused, and so are `files` of an earlier run unless allowed; returns them, for the caller to delete."""
    rank, world = dist_world()
    if rank == 0:
        made = not os.path.isdir(out)
        try:
            os.makedirs(out, exist_ok=True)
            if not os.access(out, os.W_OK):
                raise PermissionError(13, "not writable")
        except OSError as e:
            raise UsageError(f"cannot write to --out {out} ({e.strerror or e}); choose a writable directory")
        if os.path.abspath(out) not in _HELD:
            fd = os.open(out, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(f"--out {out} is in use by another l2l.py run; wait for it or choose another --out")
            _HELD[os.path.abspath(out)] = fd, made
        found = [f for f in files if os.path.lexists(os.path.join(out, f))]
        if found and not allow:
            use = "pass --resume, --overwrite" if "last.pt" in found else "pass --overwrite"
            raise UsageError(f"--out {out} holds {', '.join(found)} of an earlier run: {use} or another --out")
    if world > 1:
        dist.barrier()
    return [os.path.join(out, f) for f in found] if rank == 0 else []


def build_run(args, device) -> Run:
    """The classifier, its optimiser (SGD or Adam) and the method's learned networks, in --channels-last's format."""
    fmt = memory_format(args)
    model = build_model(args.model, args.dataset, args.depth, args.width, args.input_mean, args.input_std,
                        args.preact_shortcut).to(device, memory_format=fmt)
    params, wd = model.parameters(), args.weight_decay
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=wd) if args.optimizer == "adam" else \
        torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=wd)
    method = METHODS[args.method]
    extras = method.setup(args) if method.setup else {}
    for net in extras.values():  # in place: Module.to keeps the Parameter objects that setup's optimisers hold
        if isinstance(net, nn.Module):
            net.to(device, memory_format=fmt)
    return Run(model, optimizer, args, extras)


def restore(run: Run, ckpt: dict, what: str, optimizer: bool = True) -> None:
    """Load a checkpoint's networks (and optimisers) into the run; a checkpoint of another network is one line."""
    try:
        run.model.load_state_dict(ckpt["model"])
        for k, v in run.extras.items():
            if (optimizer or isinstance(v, nn.Module)) and k in ckpt.get("extras", {}):
                v.load_state_dict(ckpt["extras"][k])
        if optimizer:
            run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:  # torch's first line names neither network
        net = lambda a: f"{a['model']} (depth {a['depth']}, width {a['width']}) for {a['dataset']}"
        raise UsageError(f"{what} does not fit this run's {net(vars(run.args))}: it holds a {net(ckpt['args'])} "
                         f"({str(e).splitlines()[-1].strip()[:80]}); pass a checkpoint of the same model and dataset")


def evaluation_extras(args, run: Run, device) -> dict:
    """What the attacks need beyond the classifier: the learned networks and, for 'transfer', --transfer-from's."""
    extras = dict(run.extras)
    if args.transfer_from:
        source = read_checkpoint(args.transfer_from, "--transfer-from")
        if source["args"]["dataset"] != args.dataset:
            raise UsageError(f"--transfer-from: {args.transfer_from} is a {source['args']['dataset']} model")
        extras["transfer_source"] = load_model(source, device)
    return extras


def fit_rnn(args, model: nn.Module, data: Data) -> nn.Module:
    """--rnn-fit N: a fresh m_phi (--rnn-design, --rnn-hidden) trained alone against the frozen classifier, as steps
    1-2 of Algorithm 1 without step 3: N batches of --batch-size from the training split (augmented, seeded by
    --seed), T = --steps, alpha = --step-size, phi's objective by --rnn-weights and --rnn-objective, the classifier
    in eval mode (theta and its BN statistics never change)."""
    rnn, rnn_opt = setup_rnn(args).values()
    rnn.to(data.x_train.device, memory_format=memory_format(args))
    gen, fitted = torch.Generator(device=data.x_train.device).manual_seed(args.seed), 0
    model.eval()
    while fitted < args.rnn_fit:
        for x, y in train_batches(data, args.batch_size, args.augment, gen, True, args.crop_pad):
            rnn_optimizer_step(model, rnn, rnn_opt, x.contiguous(memory_format=memory_format(args)), y,
                               **dict(rnn_keywords(args), attack_bn="eval"), trades=args.method == "rnn-trades")
            fitted += 1
            if fitted == args.rnn_fit:
                break
    return rnn.eval()


def resume_state(run: Run, out: str, gen: torch.Generator) -> tuple:
    """--resume: last.pt restored (networks, optimisers, random generators) after checking that it was trained with
    this command's training flags. Returns (run_id, epoch, best, history)."""
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    ckpt = read_checkpoint(last_path, "--resume: checkpoint")
    for k in KEYS["t"]:
        if ckpt["args"].get(k) != getattr(run.args, k):
            raise UsageError(f"--resume: {last_path} was trained with --{k.replace('_', '-')} {ckpt['args'].get(k)}, "
                             f"this command gives {getattr(run.args, k)}; repeat the original flags")
    if (ckpt["rng"]["cuda"] is None) != (gen.device.type == "cpu"):  # its generator state is its device's
        raise UsageError(f"--resume: {last_path} was trained on another device; resume it with --device "
                         f"{'cpu' if ckpt['rng']['cuda'] is None else 'cuda'}")
    if ckpt["best"]["epoch"] == ckpt["epoch"]:  # a kill between the epoch's two saves may have left best.pt behind
        atomic_write(best_path, lambda tmp: shutil.copyfile(last_path, tmp))
    restore(run, ckpt, f"--resume: {last_path}")
    torch.set_rng_state(ckpt["rng"]["torch"])
    gen.set_state(ckpt["rng"]["data"])
    if ckpt["rng"]["cuda"] is not None and gen.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["run_id"], ckpt["epoch"], ckpt["best"], ckpt["history"]


def model_name(a) -> str:
    """The classifier as logs and reports name it: smallcnn, preactresnet18 (width 16 where not 64), wrn-34-10."""
    return f"wrn-{a.depth}-{a.width}" if a.model == "wrn" else a.model + (
        f" (width {a.width})" if a.model == "preactresnet18" and a.width != 64 else "")


def describe(args, run: Run, data: Data, device, world: int) -> str:
    """The run's settings, as the first lines of its log (results.json records every flag)."""
    a = fmt_eps(fast_bat_step_size(args.eps))
    step = {"plain": "no attack", "pgd-at-bls": "first BLS step eps", "fast-bat": f"step a {a}",
            **dict.fromkeys(L2L_VARIANTS, "learned attacker")}.get(args.method, f"step {fmt_eps(args.step_size)}")
    nets = ", ".join(f"{model_name(args) if n is run.model else type(n).__name__} "
                     f"{sum(map(torch.numel, n.parameters())):,} parameters" for n in run_networks(run))
    return (f"{args.method} ({METHODS[args.method].paper}) on {args.dataset}: {nets}; {len(data.x_train)} train / "
            f"{len(data.x_val)} val / {len(data.x_test)} test, {device}{f' x {world} processes' if world > 1 else ''}\n"
            f"  eps {fmt_eps(args.eps)}, steps {args.steps}, {step}, attack BN {args.attack_bn}, epochs {args.epochs}, "
            f"batch {args.batch_size}, {args.optimizer} lr {args.lr} {args.lr_schedule}, wd {args.weight_decay}, seed "
            f"{args.seed}, training {args.precision} (evaluation fp32; no TF32), channels_last {args.channels_last}, "
            f"compile {args.compile}")


def train(args, on_epoch_end: Optional[Callable] = None) -> dict:
    """Train, choose the best epoch on validation robust accuracy (the last with --val-size 0), evaluate best.pt and
    last.pt on the test set; on_epoch_end(epoch) after each saved epoch. Under torchrun rank 0 writes."""
    device = setup_process(args)
    rank, world = dist_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    earlier = prepare_out_dir(args.out, () if args.resume else ("last.pt", "best.pt", "results.json"), args.overwrite)
    data = load_data(args, device)
    args.batch_size = min(args.batch_size, data.x_train.shape[0])  # results.json records the batch that ran
    run = build_run(args, device)
    make_data_parallel(run)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # the same on every rank: the same global batches
    eval_extras = evaluation_extras(args, run, device)  # fails before training if --transfer-from is bad
    run_id, start_epoch, best, history = uuid.uuid4().hex, 0, {"epoch": 0, "val_robust": -1.0}, []
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    if args.resume:
        run_id, start_epoch, best, history = resume_state(run, args.out, gen)
        say(f"resumed {last_path} after epoch {start_epoch}")
    if args.compile:
        compile_networks(run)
    for path in earlier:  # --overwrite: the earlier run's files go now, before this run writes
        os.remove(path)
    say(describe(args, run, data, device, world))
    min_last = max(2, world)
    iters = max(1, batches_per_epoch(data.x_train.shape[0], args.batch_size, min_last=min_last))
    no_val = data.x_val.shape[0] == 0  # --val-size 0: nothing to choose on, the last epoch is the one evaluated
    cpu_note = device.type == "cpu"  # say once what a run sized for a GPU will take here
    for epoch in range(start_epoch, args.epochs):
        if world > 1:  # each rank its own attack noise and dropout, reproducible on --resume
            torch.manual_seed(args.seed * 1_000_003 + epoch * 1009 + rank + 1)
        t0 = time.time()
        run.model.train()
        loss_sum = correct = seen = 0
        measured = [h["seconds"] for h in history]  # a finished epoch's time includes its validation
        later = lambda rate, left=args.epochs - epoch - 1: left * (sum(measured) / len(measured) if measured else
                                                                    iters / rate)
        ticker = Ticker(f"epoch {epoch + 1}/{args.epochs}", iters, rank == 0 and not args.quiet, later=later)
        for i, (x, y) in enumerate(train_batches(data, args.batch_size, args.augment, gen, False, args.crop_pad,
                                                 min_last)):
            lr, momentum = schedule_at(args, epoch * iters + i, iters)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
                if "momentum" in group:  # SGD's; Adam has none
                    group["momentum"] = momentum
            loss, n_correct = training_step(run, x, y)
            n = y.shape[0] // world  # this rank's share
            loss_sum, correct, seen = loss_sum + loss.float() * n, correct + n_correct, seen + n
            ticker.step()
            if cpu_note and ticker.last > ticker.start:  # once, at the first progress line
                rate = ticker.done / (ticker.last - ticker.start)
                cpu_note, whole = False, (iters - ticker.done) / rate + ticker.later(rate)
                if whole > 6 * 3600:
                    say(f"note: on this CPU the first batches suggest {duration(whole)} for the whole run: this recipe "
                        f"is sized for a GPU (bash run.sh list shows which rows fit a CPU)", flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.time() - t0
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
        val_clean, val_robust = (None, None) if no_val else validate(run.model, data, args)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "val_clean": val_clean, "val_robust": val_robust, "train_seconds": train_seconds,
                  "seconds": time.time() - t0}
        if not math.isfinite(record["train_loss"]):  # the same on every rank (all-reduced): all stop together
            raise UsageError(f"training diverged: the train loss of epoch {epoch + 1} is {record['train_loss']}; "
                             f"last.pt keeps epoch {epoch}; lower --lr (now {args.lr:g}) and start again")
        history.append(record)
        is_best = no_val or val_robust > best["val_robust"]
        if is_best:
            best = {"epoch": epoch + 1, "val_robust": val_robust, "val_clean": val_clean}
        if rank == 0:  # last.pt first: a kill between the two saves leaves a last.pt that --resume can continue
            state = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "args": vars(args), "epoch": epoch + 1,
                     "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "extras": {k: v.state_dict() for k, v in run.extras.items()}, "best": best, "history": history,
                     "rng": {"torch": torch.get_rng_state(), "data": gen.get_state(),
                             "cuda": torch.cuda.get_rng_state() if gen.device.type == "cuda" else None}}
            atomic_write(last_path, lambda tmp: torch.save(state, tmp))
            if is_best:
                atomic_write(best_path, lambda tmp: torch.save(state, tmp))
        if world > 1:
            dist.barrier()  # the checkpoints exist before any rank reads them
        say(f"epoch {epoch + 1:>3}/{args.epochs}  lr {lr:.4f}  loss {record['train_loss']:.4f}  train acc "
            f"({'clean' if args.method == 'plain' else 'adversarial'}) {100 * record['train_acc']:.2f}%  " +
            ("no validation split  " if no_val else
             f"val clean {100 * val_clean:.2f}%  val pgd-{args.val_steps} {100 * val_robust:.2f}%  ") +
            f"{train_seconds:.1f}s train  {record['seconds']:.1f}s total{'  *best' if is_best else ''}", flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    attacks = args.eval_attacks.split(",")
    results = {"method": args.method, "dataset": args.dataset, "model": args.model, "args": vars(args),
               "device": device_name(device) + (f" x {world}" if world > 1 else ""),
               "checkpoint": "best.pt", "best_epoch": best["epoch"], "history": history}
    for path, epoch in ((best_path, best["epoch"]), (last_path, args.epochs)):
        if path == last_path and epoch == best["epoch"]:
            break  # "last" is the evaluation above
        if path == last_path and not args.eval_last:
            results["last"] = f"epoch {epoch} not evaluated (--no-eval-last)"
            break
        restore(run, read_checkpoint(path, "checkpoint"), path)
        results["last"] = evaluate(run.model, data.x_test, data.y_test, args, attacks, eval_extras)
        if path == best_path:
            results.update(results["last"])
        say(format_results(results["last"], f"test, {os.path.basename(path)} (epoch {epoch}" + (
            ")" if path == last_path else ", the last: --val-size 0)" if no_val else ", chosen on validation)")))
    if rank == 0:
        write_results(results, args.out)
    say(f"wrote {args.out}/results.json, best.pt, last.pt")
    if world > 1:
        dist.barrier()
    return results


def evaluate_checkpoint(args) -> dict:
    """--eval-only: the checkpoint's networks on the test set (sharded over ranks under torchrun; rank 0 writes)."""
    ckpt = read_checkpoint(args.eval_only, "--eval-only")
    device = setup_process(args)
    rank = dist_world()[0]
    earlier = prepare_out_dir(args.out, ("results.json",), args.overwrite)
    data = load_data(args, device, test_only=not args.rnn_fit)
    run = build_run(args, device)
    if args.rnn_fit:  # the checkpoint's own m_phi, if any, gives way to the fitted one
        run.extras.pop("rnn", None)
    restore(run, ckpt, f"--eval-only {args.eval_only}", optimizer=False)
    if args.rnn_fit:
        run.extras["rnn"] = fit_rnn(args, run.model, data)
    for path in earlier:
        os.remove(path)
    if rank == 0 and not args.quiet:
        print(f"evaluating {args.eval_only} (epoch {ckpt['epoch']}): {args.method} on {args.dataset}, {args.model}, "
              f"eps {fmt_eps(args.eps)}, attacks {args.eval_attacks}", flush=True)
    if args.compile:
        compile_networks(run)
    results = {"method": args.method, "dataset": args.dataset, "model": args.model, "args": vars(args),
               "device": device_name(device), "checkpoint": os.path.abspath(args.eval_only), "epoch": ckpt["epoch"]}
    results.update(evaluate(run.model, data.x_test, data.y_test, args, args.eval_attacks.split(","),
                            evaluation_extras(args, run, device)))
    if rank == 0:
        print(format_results(results, f"test, {args.eval_only} (epoch {ckpt['epoch']})"))
        write_results(results, args.out)
        print(f"wrote {args.out}/results.json")
    if dist_world()[1] > 1:
        dist.barrier()
    return results


# ================================================================================================
# Benchmark, report and main.


def benchmark(args) -> dict:
    """--benchmark: time the method's training step on synthetic data of the dataset's shape (every method's loops run
    fixed iterations): --bench-warmup steps untimed (compilation, cudnn autotuning), then --bench-steps timed."""
    device = setup_process(args)
    rank, world = dist_world()
    spec, steps, warmup, bs = DATASETS[args.dataset], args.bench_steps, args.bench_warmup, args.batch_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randint(0, 256, (bs * (steps + warmup), *spec["shape"]), dtype=torch.uint8, device=device, generator=gen)
    y = torch.randint(0, spec["classes"], (x.shape[0],), device=device, generator=gen)
    run = build_run(args, device)
    make_data_parallel(run)
    if args.compile:
        compile_networks(run)
    run.model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for i, (xb, yb) in enumerate(train_batches(Data(x, y, *[x[:0], y[:0]] * 2), bs, args.augment, gen, True,
                                               args.crop_pad)):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        training_step(run, xb, yb)
    sync()
    seconds = time.perf_counter() - t0
    memory = (f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB peak allocated (CUDA, rank {rank})"
              if device.type == "cuda" else
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB peak RSS (process)")
    n_train = args.train_size or spec["n_train"] - args.val_size
    epoch_steps = batches_per_epoch(n_train, bs)
    figures = {"images_per_second": bs * steps / seconds, "seconds_per_step": seconds / steps,
               "seconds_per_epoch": epoch_steps * seconds / steps, "memory": memory}
    if rank == 0:
        print(f"benchmark {args.method} on {args.dataset} (synthetic data), {model_name(args)}, batch {bs}, steps "
              f"{args.steps}, {args.precision}, channels_last {'on' if args.channels_last else 'off'}, compile "
              f"{'on' if args.compile else 'off'}, {device_name(device)}" + (f" x {world}" if world > 1 else ""))
        print(f"  {figures['images_per_second']:,.0f} img/s  {1000 * seconds / steps:.1f} ms/step  "
              f"{figures['seconds_per_epoch']:.1f} s/epoch ({epoch_steps} steps of {bs}, {n_train} examples)  "
              f"{memory}  ({steps} timed steps after {warmup} warm-up)", flush=True)
    return figures


def mcnemar_p(only_first: int, only_second: int) -> float:
    """The exact McNemar test: a two-sided sign test on the discordant images (right under one evaluation only)."""
    n, k = only_first + only_second, min(only_first, only_second)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(first: str, second: str) -> str:
    """--paired A/results.json:ATTACK B/results.json:ATTACK: two evaluations of the same test images compared image
    by image (an attack, clean or worst_case; the per-example outcomes results.json keeps)."""
    outcomes = []
    for spec in (first, second):
        path, _, name = spec.rpartition(":")
        try:
            res = json.loads(Path(path).read_text())
            outcomes.append((name, res[name]["correct"], res["protocol"]["examples"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--paired {spec}: not a results.json with per-example outcomes of '{name}' "
                             f"({type(e).__name__} {e})")
    (a, fa, n), (b, fb, m) = outcomes
    if n != m or len(fa) != len(fb):
        raise UsageError(f"--paired: {n} and {m} test images; compare evaluations of the same images (--test-size)")
    only_a = sum(x > y for x, y in zip(fa, fb))
    only_b = sum(y > x for x, y in zip(fa, fb))
    return (f"{a} {100 * fa.count('1') / n:.2f}%, {b} {100 * fb.count('1') / n:.2f}% on the same {n} test images: "
            f"difference {100 * (only_b - only_a) / n:+.2f} points; right under {a} only {only_a}, {b} only {only_b}; "
            f"exact McNemar p = {mcnemar_p(only_a, only_b):.3g}")


# Report columns in the papers' order; a column appears when some run has it.
REPORT_ATTACKS = ("fgsm", "pgd", "cw", "cw-linf", "apgd-ce", "apgd-t", "fab-t", "square", "l2l", "rnn", "transfer",
                  "aa")


def report(paths: list) -> str:
    """--report: one markdown row per run (its best.pt evaluation), accuracies in % with the paper's in brackets
    (--paper), and a protocol column: eps, examples, each attack's steps x restarts @ step."""
    runs = []
    for path in paths:
        file = path if path.endswith(".json") else os.path.join(path, "results.json")
        if not os.path.exists(file):
            raise UsageError(f"--report {path}: no results.json there (an unfinished run?); pass finished runs, e.g. "
                             f"runs/*/results.json")
        try:
            res = json.loads(Path(file).read_text())
            res["clean"]["accuracy"] + sum(res[k]["accuracy"] for k in REPORT_ATTACKS + ("worst_case",) if k in res)
            ckpt = res.get("checkpoint", "")  # --eval-only's: the evaluated checkpoint's path, named by its run folder
            res["name"] = res["args"].get("recipe") or (os.path.join(*Path(ckpt).parts[-2:]) if os.path.isabs(ckpt)
                                                        else os.path.basename(os.path.dirname(os.path.abspath(file))))
            runs.append(res)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"--report {path}: {file} is not an l2l.py results.json ({type(e).__name__} {e})")
    attacks = [name for name in REPORT_ATTACKS if any(name in res for res in runs)]
    head = ["run", "method", "dataset", "model", "epochs", "clean", *attacks, "worst case", "s/epoch", "device",
            "protocol"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    step = lambda r: fmt_eps(r["step_size"]) if r.get("step_size") else "-"
    attack_protocol = lambda k, r: ("aa " + ("standard" if r.get("loss") == "AutoAttack (standard)" else
                                             r.get("settings")) if k == "aa" else
                                    f"{k} {r.get('steps')}x{r.get('restarts')}@{step(r)}")
    for res in runs:
        paper, history, p = res["args"].get("paper") or {}, res.get("history") or [], res["protocol"]
        cell = lambda k: "–" if k not in res else f"{100 * res[k]['accuracy']:.2f}" + (
            f" ({paper[k]:.2f})" if k in paper else "")
        seconds = [h["train_seconds"] for h in history]
        row = [res["name"], res.get("method"), res.get("dataset"), res.get("model"),
               f"{len(history)} (best {res.get('best_epoch')})" if history else f"eval of epoch {res.get('epoch')}",
               cell("clean"), *map(cell, attacks), cell("worst_case"),
               f"{sum(seconds) / len(seconds):.1f}" if seconds else "–", res.get("device"),
               f"eps {p['eps_text']}, {p['examples']} {p['split']}; " + "; ".join(
                   attack_protocol(k, res[k]) for k in res["worst_case"]["over"][1:] if k in res)]
        # a stored string is one cell: a '|' escaped, line breaks flattened
        rows.append("| " + " | ".join(" ".join(str(c).split()).replace("|", "\\|") for c in row) + " |")
    print("\n".join(rows))
    return "\n".join(rows)


RNN_FIT_KEYS = ("steps", "step_size", "attack_start", "batch_size", "rnn_design", "rnn_hidden")


def parse_args(argv=None) -> argparse.Namespace:
    """The resolved flags. --eval-only takes from the checkpoint only what its networks need (the flags marked "m"
    in FLAGS, and eps unless given); everything else comes from the command line."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        chosen = [a for a in argv if a not in ("-h", "--help")]
        if any(a in chosen for a in ("--method", "--dataset")):  # --help for this method and dataset
            build_parser(vars(resolve_args(parser.parse_known_args(chosen)[0]))).parse_args(argv)
    args = parser.parse_args(argv)
    if args.report or args.paired:
        return args  # reads results.json files; no other flag applies
    if args.eval_only:
        if args.resume or args.benchmark:
            raise UsageError("--eval-only trains nothing: drop --resume and --benchmark")
        ckpt = read_checkpoint(args.eval_only, "--eval-only")
        # --rnn-fit: the fresh m_phi's flags (and its T, alpha, start, batch) come from the command line
        keys = [k for k in KEYS["m"] if not (args.rnn_fit and k in RNN_FIT_KEYS)]
        given = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys
                 if getattr(args, k) not in (parser.get_default(k), ckpt["args"][k])]
        if given:
            print(f"note: --eval-only takes the checkpoint's network; ignored: {', '.join(given)}", file=sys.stderr)
        for k in keys:
            setattr(args, k, ckpt["args"][k])
        args.eps = ckpt["args"]["eps"] if args.eps is None else args.eps
        args.recipe = args.recipe or ckpt["args"].get("recipe")  # the row it evaluates, for --report
        stem = os.path.splitext(os.path.basename(args.eval_only))[0]  # --out: eval_<stem> beside the checkpoint
        args.out = args.out or os.path.join(os.path.dirname(args.eval_only) or ".", f"eval_{stem}")
    return resolve_args(args)


def main(argv=None) -> int:
    """Usage errors exit 2 with one line; an interrupt exits 130."""
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, only rank 0 speaks
    try:
        args = parse_args(argv)
        if args.report:
            report(args.report)
        elif args.paired:
            print(paired(*args.paired))
        else:
            (benchmark if args.benchmark else evaluate_checkpoint if args.eval_only else train)(args)
        return 0
    except UsageError as e:
        if rank == 0:
            print(f"l2l.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = any(os.path.exists(os.path.join(out, "last.pt")) for out in _HELD)
        print("interrupted: " + ("last.pt holds the last finished epoch; --resume continues it" if saved else
                                 "before anything was saved (no training epoch had finished)"), file=sys.stderr)
        return 130
    finally:
        while _HELD:  # release the --out folders this call held; one it made and left empty goes (a failed start)
            out, (fd, made) = _HELD.popitem()
            os.close(fd)
            if made and not os.listdir(out):
                os.rmdir(out)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
