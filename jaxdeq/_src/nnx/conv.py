"""A 'SAME' stride-1 convolution whose input gradient is a plain convolution.

XLA:CPU runs the stock input gradient of a convolution (a transposed
convolution) far slower inside a `while_loop` body than outside
(jax-ml/jax#12868), and the implicit backward calls the cell's VJP in exactly
such a loop. For odd kernels with 'SAME' padding and stride 1 the input
gradient equals a forward convolution with the kernel flipped in space and its
in/out channels swapped, which XLA runs at full speed in loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="SAME",
      dimension_numbers=_DIMENSIONS)


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """2-D 'SAME' convolution, NHWC input, HWIO kernel with odd spatial size.

  Args:
    x: (batch, height, width, in_channels).
    kernel: (kh, kw, in_channels, out_channels), kh and kw odd.

  Returns:
    (batch, height, width, out_channels).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxdeq.nnx import conv2d_same
    >>> conv2d_same(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5))).shape
    (1, 4, 4, 5)
  """
  return _conv(x, kernel)


def _conv_fwd(x, kernel):
  if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
    raise ValueError(
        f"conv2d_same needs an odd kernel size, got {kernel.shape[:2]}")
  return _conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, grad_out):
  x, kernel = residuals
  flipped = jnp.flip(kernel, axis=(0, 1)).swapaxes(2, 3)
  grad_x = _conv(grad_out, flipped)
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k), kernel)
  return grad_x, kernel_vjp(grad_out)[0]


conv2d_same.defvjp(_conv_fwd, _conv_bwd)
