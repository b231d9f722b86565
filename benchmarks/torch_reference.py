"""A PyTorch reference of the tutorial's MNIST layers and epoch loop.

Written for these benchmarks from the tutorial's description (chapter 1):
plain iteration with autograd through the loop, Newton with the closed-form
Jacobian (unconverged samples set to zero), and Newton run without autograd
plus an implicit backward hook solving with J^T. Benchmark-only: torch is not a
dependency of jaxdeq.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


class TanhFixedPoint(nn.Module):

  def __init__(self, width, tol=1e-4, max_iter=200):
    super().__init__()
    self.linear = nn.Linear(width, width, bias=False)
    self.tol, self.max_iter = tol, max_iter

  def forward(self, x):
    z = torch.zeros_like(x)
    self.iterations = 0
    while self.iterations < self.max_iter:
      z_next = torch.tanh(self.linear(z) + x)
      err = torch.norm(z - z_next)
      z = z_next
      self.iterations += 1
      if err < self.tol:
        break
    return z


def _newton(linear, x, tol, max_iter):
  z = torch.tanh(x)
  iterations = 0
  eye = torch.eye(z.shape[1], dtype=z.dtype)[None]
  jac = None
  while iterations < max_iter:
    z_linear = linear(z) + x
    g = z - torch.tanh(z_linear)
    if torch.norm(g) < tol:
      break
    jac = eye - (1 / torch.cosh(z_linear) ** 2)[:, :, None] * linear.weight[None]
    z = z - torch.linalg.solve(jac, g)
    iterations += 1
  return z, jac, iterations


class TanhNewton(nn.Module):

  def __init__(self, width, tol=1e-4, max_iter=40):
    super().__init__()
    self.linear = nn.Linear(width, width, bias=False)
    self.tol, self.max_iter = tol, max_iter

  def forward(self, x):
    z, _, self.iterations = _newton(self.linear, x, self.tol, self.max_iter)
    g = z - torch.tanh(self.linear(z) + x)
    z = torch.where((torch.norm(g, dim=1) > self.tol)[:, None],
                    torch.zeros_like(z), z)
    return z


class TanhNewtonImplicit(nn.Module):

  def __init__(self, width, tol=1e-4, max_iter=40):
    super().__init__()
    self.linear = nn.Linear(width, width, bias=False)
    self.tol, self.max_iter = tol, max_iter

  def forward(self, x):
    with torch.no_grad():
      z, jac, self.iterations = _newton(self.linear, x, self.tol,
                                        self.max_iter)
      if jac is None:
        z_linear = self.linear(z) + x
        jac = torch.eye(z.shape[1])[None] - (
            1 / torch.cosh(z_linear) ** 2)[:, :, None] * self.linear.weight[None]
    z = torch.tanh(self.linear(z) + x)
    if z.requires_grad:
      jac_t = jac.transpose(1, 2)
      z.register_hook(lambda grad: torch.linalg.solve(jac_t, grad))
    return z


LAYERS = {"fixed_point": TanhFixedPoint, "newton": TanhNewton,
          "newton_implicit": TanhNewtonImplicit}


def make_model(layer: str, seed: int = 0) -> nn.Sequential:
  torch.manual_seed(seed)
  return nn.Sequential(nn.Flatten(), nn.Linear(784, 100),
                       LAYERS[layer](100), nn.Linear(100, 10))


def load_jax_weights(model: nn.Sequential, weights: dict) -> None:
  """Copies jaxdeq's MNIST model weights (x @ kernel convention) into `model`.

  `weights` maps "linear_in", "cell", "linear_out" to {"kernel", ["bias"]}
  numpy arrays; torch's nn.Linear computes x @ weight.T, hence the transposes.
  """
  with torch.no_grad():
    for module, name in ((model[1], "linear_in"), (model[2].linear, "cell"),
                         (model[3], "linear_out")):
      module.weight.copy_(torch.from_numpy(np.asarray(
          weights[name]["kernel"], np.float32).T.copy()))
      if "bias" in weights[name]:
        module.bias.copy_(torch.from_numpy(np.array(
            weights[name]["bias"], np.float32)))


def run_epoch(images, labels, model, opt=None, batch_size=100, order=None):
  """The tutorial's epoch (with its NaN guard).

  Returns error, loss, solver steps per batch, seconds and skipped updates.

  `order` is the training permutation (default: the given order).
  """
  total_loss, total_err, total_steps, skipped = 0.0, 0, 0, 0
  model.eval() if opt is None else model.train()
  order = (torch.as_tensor(np.asarray(order), dtype=torch.int64)
           if order is not None else torch.arange(len(images)))
  batches = 0
  started = time.perf_counter()
  with torch.set_grad_enabled(opt is not None):
    for start in range(0, len(images) - batch_size + 1, batch_size):
      rows = order[start:start + batch_size]
      x, y = images[rows], labels[rows]
      yp = model(x)
      loss = nn.functional.cross_entropy(yp, y)
      if opt is not None:
        opt.zero_grad()
        loss.backward()
        if sum(torch.sum(torch.isnan(p.grad)) for p in model.parameters()) == 0:
          opt.step()
        else:
          skipped += 1
      total_err += (yp.argmax(1) != y).sum().item()
      total_loss += loss.item() * len(x)
      total_steps += model[2].iterations
      batches += 1
  seconds = time.perf_counter() - started
  n = batches * batch_size
  return total_err / n, total_loss / n, total_steps / batches, seconds, skipped


def train(layer, dataset, epochs, threads=2, weights=None, orders=None):
  """Trains like the tutorial; returns one dict per epoch.

  `weights` (see `load_jax_weights`) and `orders` (one training permutation
  per epoch) let a run start from jaxdeq's initial weights and see its
  batches, so that the two test errors compare like for like.
  """
  torch.set_num_threads(threads)
  to_x = lambda a: torch.from_numpy(
      a.reshape(len(a), -1).astype(np.float32) / 255.0)
  train_x, train_y = to_x(dataset.train_images), torch.from_numpy(
      dataset.train_labels.astype(np.int64))
  test_x, test_y = to_x(dataset.test_images), torch.from_numpy(
      dataset.test_labels.astype(np.int64))
  model = make_model(layer)
  if weights is not None:
    load_jax_weights(model, weights)
  opt = torch.optim.SGD(model.parameters(), lr=0.1)
  history = []
  for epoch in range(epochs):
    if epoch == 5:
      opt.param_groups[0]["lr"] = 0.01
    train_err, train_loss, train_steps, seconds, skipped = run_epoch(
        train_x, train_y, model, opt,
        order=orders[epoch] if orders is not None else torch.randperm(
            len(train_x), generator=torch.Generator().manual_seed(epoch)))
    test_err, test_loss, test_steps, _, _ = run_epoch(test_x, test_y, model)
    history.append(dict(epoch=epoch + 1, train_error=train_err,
                        train_loss=train_loss, forward_steps=train_steps,
                        test_error=test_err, test_loss=test_loss,
                        test_forward_steps=test_steps, train_seconds=seconds,
                        skipped_steps=skipped))
  return history
