"""Complex states: every solver finds complex fixed points, and every adjoint
differentiates them by JAX's conventions (checked against closed forms and
against finite differences, complex128)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxdeq

TOL = 1e-12
SOLVERS = {
    "fixed_point_iteration": jaxdeq.FixedPointIteration(tol=TOL,
                                                        max_steps=500),
    "anderson": jaxdeq.Anderson(tol=TOL, max_steps=200),
    "anderson_relative": jaxdeq.Anderson(tol=TOL, max_steps=200,
                                         lam_relative=True),
    "broyden": jaxdeq.Broyden(tol=TOL, max_steps=200),
    "newton": jaxdeq.Newton(tol=TOL),
    "newton_gmres": jaxdeq.Newton(tol=TOL, linear_solver=jaxdeq.GMRES(
        tol=1e-12, max_restarts=0)),
}
C = 0.5 + 0.3j


def affine(z, b):
  return C * z + b


def rhs(dtype=jnp.complex128):
  return jnp.array([[1.0 + 2.0j, 0.5 - 1.0j, -0.25j],
                    [2.0 - 1.0j, 0.0 + 0.0j, 1.5 + 0.5j]], dtype)


def tanh_args():
  key_w, key_x = jax.random.split(jax.random.key(0))
  w = (0.3 * jax.random.normal(key_w, (3, 3), jnp.complex128))
  x = 0.5 * jax.random.normal(key_x, (2, 3), jnp.complex128)
  return w, x


def tanh_cell(z, args):
  w, x = args
  return jnp.tanh(z @ w + x)


@pytest.mark.parametrize("name", SOLVERS)
def test_affine_fixed_point_is_b_over_one_minus_c(name, x64):
  b = rhs()
  sol = jaxdeq.fixed_point(affine, jnp.zeros_like(b), b,
                           solver=SOLVERS[name])
  assert sol.value.dtype == jnp.complex128
  assert bool(jnp.all(sol.stats.converged))
  np.testing.assert_allclose(sol.value, b / (1 - C), rtol=1e-10, atol=1e-10)
  assert sol.stats.residual.dtype == jnp.float64


@pytest.mark.parametrize("name", SOLVERS)
def test_complex_tanh_fixed_point(name, x64):
  args = tanh_args()
  sol = jaxdeq.fixed_point(tanh_cell, jnp.zeros((2, 3), jnp.complex128), args,
                           solver=SOLVERS[name])
  assert bool(jnp.all(sol.stats.converged))
  np.testing.assert_allclose(tanh_cell(sol.value, args), sol.value,
                             rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["anderson", "newton", "newton_gmres"])
def test_implicit_tangent_of_affine_is_v_over_one_minus_c(name, x64):
  b, v = rhs(), jnp.conj(rhs())[::-1]
  solve = lambda b: jaxdeq.fixed_point(affine, jnp.zeros_like(b), b,
                                       solver=SOLVERS[name]).value
  _, tangent = jax.jvp(solve, (b,), (v,))
  np.testing.assert_allclose(tangent, v / (1 - C), rtol=1e-9, atol=1e-9)
  # Reverse mode: the cotangent of a holomorphic map is its transpose
  # applied to the output cotangent: here ct / (1 - c).
  _, pullback = jax.vjp(solve, b)
  np.testing.assert_allclose(pullback(v)[0], v / (1 - C), rtol=1e-9,
                             atol=1e-9)


ADJOINTS = {
    "implicit": (jaxdeq.ImplicitAdjoint(), ("fwd", "rev")),
    "implicit_gmres": (
        jaxdeq.ImplicitAdjoint(linear_solver=jaxdeq.GMRES(tol=1e-12)),
        ("fwd", "rev")),
    "unrolled": (jaxdeq.UnrolledAdjoint(), ("rev",)),
    "phantom": (jaxdeq.PhantomAdjoint(steps=200, damping=1.0), ("rev",)),
    "neumann": (jaxdeq.NeumannAdjoint(terms=200), ("rev",)),
}


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("solver", ["fixed_point_iteration", "anderson"])
def test_gradients_match_finite_differences(adjoint, solver, x64):
  adjoint, modes = ADJOINTS[adjoint]
  w, x = tanh_args()

  def loss(w, x):
    z = jaxdeq.fixed_point(tanh_cell, jnp.zeros_like(x), (w, x),
                           solver=SOLVERS[solver], adjoint=adjoint).value
    return jnp.sum(jnp.abs(z) ** 2 + jnp.real(z) * jnp.imag(z))

  check_grads(loss, (w, x), order=1, modes=modes, atol=1e-5, rtol=1e-5)


def test_complex_aux_and_mixed_real_complex_state(x64):
  # {"r": real, "c": complex}: the real leaf stays real, and the solve works
  # in complex128.
  def f(z, x):
    r = 0.5 * jnp.tanh(z["r"]) + jnp.real(x)
    c = C * z["c"] + x * r.astype(x.dtype)
    return {"r": r, "c": c}, jnp.sum(jnp.abs(c), axis=1)

  x = rhs()
  z0 = {"r": jnp.zeros((2, 3)), "c": jnp.zeros_like(x)}
  sol = jaxdeq.fixed_point(f, z0, x, has_aux=True,
                           solver=jaxdeq.Anderson(tol=TOL, max_steps=200))
  assert sol.value["r"].dtype == jnp.float64
  assert sol.value["c"].dtype == jnp.complex128
  image, aux = f(sol.value, x)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10,
                                                       atol=1e-10)
  chex_close(image["r"], sol.value["r"])
  chex_close(image["c"], sol.value["c"])
  chex_close(sol.aux, aux)

  def loss(x):
    sol = jaxdeq.fixed_point(f, z0, x, has_aux=True,
                             solver=jaxdeq.Anderson(tol=TOL, max_steps=200))
    return jnp.sum(sol.value["r"] ** 2) + jnp.sum(jnp.abs(sol.value["c"]))

  check_grads(loss, (x,), order=1, modes=("fwd", "rev"), atol=1e-5,
              rtol=1e-5)


def test_complex64_state_converges_in_single_precision():
  b = rhs(jnp.complex64)
  sol = jaxdeq.fixed_point(affine, jnp.zeros_like(b), b,
                           solver=jaxdeq.Anderson(tol=1e-5))
  assert sol.value.dtype == jnp.complex64
  np.testing.assert_allclose(sol.value, b / (1 - C), rtol=1e-4, atol=1e-4)


def test_integer_state_is_refused_with_a_hint():
  with pytest.raises(TypeError, match="floating or complex"):
    jaxdeq.fixed_point(lambda z, _: z, jnp.zeros((2, 3), jnp.int32), None)


def test_shine_reuses_broyden_estimate_for_complex_states(x64):
  w, x = tanh_args()

  def loss(adjoint, x):
    z = jaxdeq.fixed_point(tanh_cell, jnp.zeros_like(x), (w, x),
                           solver=SOLVERS["broyden"], adjoint=adjoint).value
    return jnp.sum(jnp.abs(z) ** 2)

  # Unrefined, the gradient is the estimate's (as rough as Broyden's inverse
  # estimate is, for real states too): finite, complex.
  shine = jax.grad(lambda x: loss(jaxdeq.SHINEAdjoint(fallback_tol=np.inf),
                                  x))(x)
  assert shine.dtype == jnp.complex128
  assert bool(jnp.all(jnp.isfinite(shine)))
  implicit = jax.grad(lambda x: loss(jaxdeq.ImplicitAdjoint(), x))(x)
  refined = jax.grad(lambda x: loss(jaxdeq.SHINEAdjoint(fallback_tol=1e-30),
                                    x))(x)
  np.testing.assert_allclose(refined, implicit, rtol=1e-9, atol=1e-9)
