"""Sharded allocation on 8 simulated devices equals the single-device selection."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax import allocation

MESH_SHAPES = ((8, 1), (4, 2), (2, 4), (1, 8))


def _mesh(n_data, n_model):
  devices = np.array(jax.devices()[:n_data * n_model]).reshape(n_data, n_model)
  return Mesh(devices, ("data", "model"))


def _scores(kind, b=32, f=64, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return rng.normal(size=(b, f)).astype(np.float32)
  if kind == "ties":
    return rng.integers(-2, 3, size=(b, f)).astype(np.float32)
  if kind == "skewed":  # a few rows want far more than their candidates
    s = rng.normal(size=(b, f)).astype(np.float32)
    s[3] += 50.0
    return s
  raise ValueError(kind)


def _place(s, mesh):
  return jax.device_put(jnp.asarray(s), NamedSharding(mesh, P("data", "model")))


class ShardedAllocationTest(parameterized.TestCase):

  @parameterized.product(mesh_shape=MESH_SHAPES, kind=("normal", "ties", "skewed"))
  def test_mutual_choice(self, mesh_shape, kind):
    mesh = _mesh(*mesh_shape)
    s = _scores(kind)
    got = jax.jit(lambda x: allocation.mutual_choice_sharded(x, 3, mesh, max_per_row=4))(
        _place(s, mesh))
    want = allocation.mutual_choice(jnp.asarray(s), 3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  @parameterized.product(mesh_shape=MESH_SHAPES, kind=("normal", "ties"))
  def test_topk(self, mesh_shape, kind):
    mesh = _mesh(*mesh_shape)
    s = _scores(kind)
    got = jax.jit(lambda x: allocation.topk_sharded(x, 5, mesh))(_place(s, mesh))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(allocation.topk(jnp.asarray(s), 5)))

  @parameterized.product(mesh_shape=MESH_SHAPES, kind=("normal", "ties"), zipf=(False, True))
  def test_feature_choice(self, mesh_shape, kind, zipf):
    mesh = _mesh(*mesh_shape)
    s = _scores(kind)
    cap = (allocation.zipf_capacities(64, 32 * 3, 1.0, max_capacity=32) if zipf else 2)
    got = jax.jit(lambda x: allocation.feature_choice_sharded(x, cap, mesh))(_place(s, mesh))
    want = allocation.feature_choice(jnp.asarray(s), cap)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  def test_output_stays_sharded(self):
    mesh = _mesh(4, 2)
    out = jax.jit(lambda x: allocation.mutual_choice_sharded(x, 2, mesh))(
        _place(_scores("normal"), mesh))
    self.assertEqual(out.sharding.spec, P("data", "model"))

  def test_indivisible_shape_error(self):
    with self.assertRaisesRegex(ValueError, "divide evenly"):
      allocation.topk_sharded(jnp.zeros((6, 64)), 2, _mesh(4, 2))

  def test_mesh_axes_error(self):
    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    with self.assertRaisesRegex(ValueError, "axes"):
      allocation.topk_sharded(jnp.zeros((4, 4)), 2, mesh)
