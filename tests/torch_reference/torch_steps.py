"""Reference train steps in PyTorch, written from the authors' code conventions.

Each function runs one training step of one published method on a PyTorch
model the way the authors' code does (file and line named in each docstring),
with the random draws passed in instead of drawn, so that a lockstep harness
(`lockstep.py`) can feed the very same numbers to fastadv_jax's train step:

* tml-epfl/understanding-fast-adv-training (GradAlign; "GA"): train.py and
  utils.py. FGSM, FGSM-RS, PGD-k training, GradAlign, AT for Free (its order:
  the δ step first, then the weights at x + δ_new).
* rohban-lab/catastrophic_overfitting (ZeroGrad / MultiGrad): train_cifar.py.
* de Jorge et al.'s N-FGSM (same conventions as the Rice / ZeroGrad code:
  δ clipped to the box, the model fed X + δ without a clamp in the graph).
* TreeLLi/Combating-RO-AdvLC ("LC"): src/utils/train.py, src/utils/adversary.py
  (FGSM-N + AdvLC).
* CURE and the input-gradient penalty: GradAlign Table 8's forms with the
  gradient convention of the CURE code (F-Salehi/CURE_robustness,
  CURE/CURE.py `regularizer`: gradients of the batch-mean CE, reduced per
  example, averaged) and of GA's `get_input_grad` (`ga_fgsm_reg_step`).

Conventions are arguments: `tie_rule` is the gradient of GA's `utils.clamp`
(`torch.max(torch.min(X, u), l)`) at ties, "torch1.4" (0, the PyTorch of GA's
Dockerfile, which produced the published numbers) or "current" (1/2, PyTorch
>= 1.5). Every step returns a dict with the perturbation `delta` (NCHW), the
CE at the adversarial point `ce`, the regularizer value `reg` (not multiplied
by λ; 0.0 without one) and the parameter gradients `grads` (name -> tensor,
before weight decay), after `opt.step()` has been applied.

Images are NCHW in [0, 1]; the models normalize inside (the twins of
`torch_models.py`), which is equivalent to the references' normalization in
the data loader. Mixed precision (apex) is not reproduced: parity is checked
in float32 and float64.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

TIE_RULES = ("torch1.4", "current")


# ----------------------------------------------------------------------------
# GA's utils.clamp with the tie rule of the PyTorch version that runs it.


class _Min14(torch.autograd.Function):
  """torch.min(a, b) with PyTorch 1.4's backward for `a`: 0 where a >= b."""

  @staticmethod
  def forward(ctx, a, b):
    ctx.save_for_backward(a, b)
    return torch.min(a, b)

  @staticmethod
  def backward(ctx, grad):
    a, b = ctx.saved_tensors
    return grad.masked_fill(a >= b, 0), None


class _Max14(torch.autograd.Function):
  """torch.max(a, b) with PyTorch 1.4's backward for `a`: 0 where a <= b."""

  @staticmethod
  def forward(ctx, a, b):
    ctx.save_for_backward(a, b)
    return torch.max(a, b)

  @staticmethod
  def backward(ctx, grad):
    a, b = ctx.saved_tensors
    return grad.masked_fill(a <= b, 0), None


def ga_clamp(X, lower, upper, tie_rule: str = "current"):
  """GA utils.py l.20-30: `torch.max(torch.min(X, u), l)` with 1-element bounds."""
  if tie_rule not in TIE_RULES:
    raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
  l = lower if torch.is_tensor(lower) else torch.full((1,), float(lower), dtype=X.dtype)
  u = upper if torch.is_tensor(upper) else torch.full((1,), float(upper), dtype=X.dtype)
  if tie_rule == "current":
    return torch.max(torch.min(X, u), l)
  return _Max14.apply(_Min14.apply(X, u.expand_as(X)), l.expand_as(X))


def box_clamp(X, lower, upper):
  """Rice / ZeroGrad train_cifar.py l.34-35: `torch.max(torch.min(X, u), l)` on
  tensors (used on δ, never inside the graph of a gradient)."""
  return torch.max(torch.min(X, upper), lower)


def _grads(model):
  return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _finish(model, opt, loss, delta, ce, reg):
  opt.zero_grad()
  loss.backward()
  grads = _grads(model)
  opt.step()
  return dict(delta=delta.detach(), ce=float(ce), reg=float(reg), grads=grads)


def _ga_grad_align(model, X, y, grad, eta, lam):
  """GA train.py l.192-200 (utils.get_input_grad l.70-88 with 'random_uniform')."""
  delta2 = eta.clone().requires_grad_(True)
  output2 = model(X + delta2)
  loss2 = F.cross_entropy(output2, y)
  grad2 = torch.autograd.grad(loss2, delta2, create_graph=True)[0]
  nnz = ((grad ** 2).sum([1, 2, 3]) ** 0.5 != 0) * ((grad2 ** 2).sum([1, 2, 3]) ** 0.5 != 0)
  grad1, grad2 = grad[nnz], grad2[nnz]
  n1 = (grad1 ** 2).sum([1, 2, 3]) ** 0.5
  n2 = (grad2 ** 2).sum([1, 2, 3]) ** 0.5
  cos = torch.sum(grad1 / n1[:, None, None, None] * grad2 / n2[:, None, None, None], (1, 2, 3))
  omega = 1.0 - cos.mean()
  return lam * omega, omega


# ----------------------------------------------------------------------------
# GA: FGSM, FGSM-RS, GradAlign, AT for Free (train.py l.141-207).


def ga_fgsm_step(model, opt, X, y, *, eps, alpha, init: str = "zero",
                 noise: Optional[torch.Tensor] = None, tie_rule: str = "current",
                 grad_align_lambda: float = 0.0, grad_align_noise=None,
                 free_delta: Optional[torch.Tensor] = None):
  """GA train.py l.141-207: `--attack fgsm` with `--attack_init zero|random`,
  `--fgsm_alpha alpha/eps`, optional `--grad_align_cos_lambda`, and AT for
  Free (`--minibatch_replay m`: `free_delta` is the carried δ, updated in place).

  BatchNorm running statistics are updated by every forward: the attack's
  (l.153), the CE's (l.188) and GradAlign's g₂ (l.193).
  """
  double_bp = grad_align_lambda > 0
  if free_delta is not None:
    delta = free_delta
    delta.requires_grad = True
  elif init == "zero":
    delta = torch.zeros_like(X, requires_grad=True)
  else:
    delta = noise.clone().requires_grad_(True)
  X_adv = ga_clamp(X + delta, 0, 1, tie_rule)
  output = model(X_adv)
  loss = F.cross_entropy(output, y)
  grad = torch.autograd.grad(loss, delta, create_graph=double_bp)[0]
  grad = grad.detach()
  argmax_delta = eps * torch.sign(grad)
  fgsm_alpha = alpha / eps
  delta.data = ga_clamp(delta.data + fgsm_alpha * argmax_delta, -eps, eps)
  delta.data = ga_clamp(X + delta.data, 0, 1) - X
  delta = delta.detach()
  if free_delta is not None:
    free_delta.data = delta.data
    free_delta.requires_grad = False

  output = model(X + delta)
  loss = F.cross_entropy(output, y)
  ce = loss.item()
  reg_value = 0.0
  if double_bp:
    reg, reg_value = _ga_grad_align(model, X, y, grad, grad_align_noise, grad_align_lambda)
    loss = loss + reg
    reg_value = reg_value.item()
  return _finish(model, opt, loss, delta, ce, reg_value)


def ga_pgd_step(model, opt, X, y, *, eps, alpha, steps, tie_rule: str = "current",
                noise: Optional[torch.Tensor] = None, grad_align_lambda: float = 0.0,
                grad_align_noise=None):
  """GA `utils.attack_pgd_training` (l.166-190; `rs` when `noise` is given) and
  train.py l.130-207. The monitoring pass at X (l.182-184) runs only with
  GradAlign, where it gives g₁ (with `backprop=False` and without GradAlign it
  only feeds a log and is skipped here)."""
  delta = torch.zeros_like(X) if noise is None else noise.clone()
  delta.requires_grad = True
  for _ in range(steps):
    output = model(ga_clamp(X + delta, 0, 1, tie_rule))
    loss = F.cross_entropy(output, y)
    loss.backward()
    grad = delta.grad.detach()
    delta.data = delta + alpha * torch.sign(grad)
    delta.data = ga_clamp(X + delta.data, 0, 1, tie_rule) - X
    delta.data = ga_clamp(delta.data, -eps, eps, tie_rule)
    delta.grad.zero_()
  delta = delta.detach()
  # The monitoring pass (and GradAlign's g₁): get_input_grad(delta_init='none').
  grad = None
  if grad_align_lambda > 0:
    d0 = torch.zeros_like(X, requires_grad=True)
    loss0 = F.cross_entropy(model(X + d0), y)
    grad = torch.autograd.grad(loss0, d0)[0].detach()
  model.zero_grad()
  output = model(X + delta)
  loss = F.cross_entropy(output, y)
  ce = loss.item()
  reg_value = 0.0
  if grad_align_lambda > 0:
    reg, reg_value = _ga_grad_align(model, X, y, grad, grad_align_noise, grad_align_lambda)
    loss = loss + reg
    reg_value = reg_value.item()
  return _finish(model, opt, loss, delta, ce, reg_value)


def ga_free_step(model, opt, X, y, *, eps, alpha, free_delta, tie_rule: str = "current"):
  """GA's AT for Free (train.py l.142-170 with `--minibatch_replay m`, then
  l.188-207): δ's step first (gradient through `clamp(X + δ, 0, 1)`), then the
  weight step at X + δ_new. `free_delta` (shape of X) is updated in place."""
  return ga_fgsm_step(model, opt, X, y, eps=eps, alpha=alpha, tie_rule=tie_rule,
                      free_delta=free_delta)


# ----------------------------------------------------------------------------
# CURE and the input-gradient penalty (fastadv_jax's documented convention).


def _mean_loss_input_grad(model, x, y):
  """∇ₓ of the batch-mean CE (GA utils.get_input_grad, l.70-88), with
  create_graph for the double backprop."""
  x = x.clone().requires_grad_(True)
  loss = F.cross_entropy(model(x), y)
  return torch.autograd.grad(loss, x, create_graph=True)[0]


def ga_fgsm_reg_step(model, opt, X, y, *, eps, alpha, reg: str, lam: float,
                     tie_rule: str = "current", h: Optional[float] = None):
  """GA's FGSM (train.py l.141-188) + CURE or the input-gradient penalty.

  With L the batch-mean CE: IGR mean_i ‖∇_{x_i} L(x)‖²; CURE
  mean_i ‖∇_{x_i} L(x + h z) − ∇_{x_i} L(x)‖² with z = sign(∇L(x)) a constant
  and h = ε (GradAlign Table 8). Train-mode
  forwards: the FGSM pass, the CE pass, then the regularizer's (IGR: x; CURE:
  x, x + h z).
  """
  delta = torch.zeros_like(X, requires_grad=True)
  output = model(ga_clamp(X + delta, 0, 1, tie_rule))
  grad = torch.autograd.grad(F.cross_entropy(output, y), delta)[0].detach()
  delta.data = ga_clamp(delta.data + alpha * torch.sign(grad), -eps, eps)
  delta.data = ga_clamp(X + delta.data, 0, 1) - X
  delta = delta.detach()
  output = model(X + delta)
  loss = F.cross_entropy(output, y)
  ce = loss.item()
  g_x = _mean_loss_input_grad(model, X, y)
  if reg == "input_grad_norm":
    omega = g_x.pow(2).sum((1, 2, 3)).mean()
  elif reg == "cure":
    z = torch.sign(g_x).detach()
    g_moved = _mean_loss_input_grad(model, X + (eps if h is None else h) * z, y)
    omega = (g_moved - g_x).pow(2).sum((1, 2, 3)).mean()
  else:
    raise ValueError(reg)
  loss = loss + lam * omega
  return _finish(model, opt, loss, delta, ce, omega.item())


# ----------------------------------------------------------------------------
# ZeroGrad / MultiGrad (rohban-lab train_cifar.py l.55-104, l.280-294).


def zerograd_step(model, opt, X, y, *, eps, alpha, q, noise):
  """`zero_grad(...)` with `fgsm_init='random'`, `q_iters=1`, then the CE step."""
  delta = box_clamp(noise.clone(), -X, 1 - X)
  delta.requires_grad = True
  output = model(X + delta)
  F.cross_entropy(output, y).backward()
  grad = delta.grad.detach()
  q_grad = torch.quantile(torch.abs(grad).view(grad.size(0), -1), q, dim=1)
  grad[torch.abs(grad) < q_grad.view(grad.size(0), 1, 1, 1)] = 0
  delta = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
  delta = box_clamp(delta, -X, 1 - X).detach()
  model.zero_grad()
  output = model(X + delta)
  loss = F.cross_entropy(output, y)
  return _finish(model, opt, loss, delta, loss.item(), 0.0)


def multigrad_step(model, opt, X, y, *, eps, alpha, noise):
  """`multi_grad(...)` non-parallel (the default: `--multi-parallel` is off),
  zeroing_th = samples, then the CE step. `noise`: (N, B, C, H, W)."""
  samples = noise.shape[0]
  grads = []
  for n in range(samples):
    delta = box_clamp(noise[n].clone(), -X, 1 - X)
    delta.requires_grad = True
    output = model(X + delta)
    F.cross_entropy(output, y).backward()
    grads.append(torch.clone(delta.grad.detach()))
  g = sum(torch.sign(gi) for gi in grads)
  grad = torch.where(torch.abs(g) < samples, torch.zeros_like(g), g)
  delta = torch.zeros_like(X)
  d = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
  d = box_clamp(d, -X, 1 - X).detach()
  model.zero_grad()
  output = model(X + d)
  loss = F.cross_entropy(output, y)
  return _finish(model, opt, loss, d, loss.item(), 0.0)


def n_fgsm_step(model, opt, X, y, *, eps, alpha, noise):
  """N-FGSM (de Jorge et al. 2022): η ~ U[-2ε, 2ε] clipped to the box, one
  step α = ε from X + η, no projection back to the ε-ball, box only."""
  eta = box_clamp(noise.clone(), -X, 1 - X)
  eta.requires_grad = True
  output = model(X + eta)
  grad = torch.autograd.grad(F.cross_entropy(output, y), eta)[0].detach()
  delta = eta.detach() + alpha * torch.sign(grad)
  delta = box_clamp(delta, -X, 1 - X).detach()
  output = model(X + delta)
  loss = F.cross_entropy(output, y)
  return _finish(model, opt, loss, delta, loss.item(), 0.0)


# ----------------------------------------------------------------------------
# FGSM-N + AdvLC (LC src/utils/train.py l.181-221, src/utils/adversary.py l.8-18).


def fgsm_n_advlc_step(model, opt, X, y, *, eps, step, noise, lam: float,
                      reg_top: float = 0.1):
  """LC's update: cle = clamp(X + η, 0, 1) (a leaf), one forward there gives
  the input gradient and the "clean" logits; `perturb` from cle with that
  gradient (pert = step·sign(ig) clipped to ε, adv = clamp(cle + pert, 0, 1));
  CE at adv + λ · Σ top-k |f(cle) − f(adv)| / B. Two train-mode forwards."""
  cle = torch.clamp(X + noise, 0, 1).requires_grad_(True)
  lgt_cle = model(cle)
  loss_cle = F.cross_entropy(lgt_cle, y)
  ig = torch.autograd.grad(loss_cle, cle, retain_graph=True, create_graph=False)[0]
  pert = step * torch.sign(ig)
  pert = pert.clamp(-eps, eps)
  adv = torch.clamp(cle.detach() + pert, 0, 1).detach()
  lgt_adv = model(adv)
  loss = F.cross_entropy(lgt_adv, y)
  ce = loss.item()
  batch_size = len(X)
  diff = torch.abs(lgt_cle - lgt_adv).view(-1)
  k = int(diff.numel() * reg_top)
  top, _ = torch.topk(diff, k, largest=True)
  reg = torch.sum(top) / batch_size
  loss = loss + lam * reg
  return _finish(model, opt, loss, adv - X, ce, reg.item())


# ----------------------------------------------------------------------------
# BatchNorm with the running variance of the biased batch variance.


class BiasedVarBatchNorm2d(nn.BatchNorm2d):
  """BatchNorm2d whose running variance averages the *biased* batch variance.

  PyTorch averages the unbiased one (n/(n-1)), Flax the biased one; the
  lockstep harness swaps this in to compare everything else exactly, and
  reports the genuine PyTorch difference separately. Normalization is
  PyTorch's own (biased variance in both)."""

  def forward(self, x):
    if not self.training:
      return super().forward(x)
    out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    with torch.no_grad():
      mean = x.mean(dim=(0, 2, 3))
      var = x.var(dim=(0, 2, 3), unbiased=False)
      self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
      self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
      self.num_batches_tracked.add_(1)
    return out


def use_biased_running_var(model: nn.Module) -> nn.Module:
  """Replaces every BatchNorm2d of `model` (in place) by `BiasedVarBatchNorm2d`."""
  for name, child in list(model.named_children()):
    if type(child) is nn.BatchNorm2d:  # pylint: disable=unidiomatic-typecheck
      new = BiasedVarBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
      new.load_state_dict(child.state_dict())
      new.to(child.weight.dtype)
      setattr(model, name, new)
    else:
      use_biased_running_var(child)
  return model
