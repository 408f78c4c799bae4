"""Tests for runkit.mesh.make_mesh (8 simulated CPU devices, see tests/conftest.py)."""

from absl.testing import absltest
import jax
from jax.sharding import AxisType

import runkit


class MakeMeshTest(absltest.TestCase):

  def test_shapes_and_the_free_axis(self):
    mesh = runkit.make_mesh({"data": None, "model": 2})
    self.assertEqual(dict(mesh.shape), {"data": 4, "model": 2})
    self.assertEqual(mesh.axis_types, (AxisType.Auto, AxisType.Auto))
    self.assertEqual(list(mesh.devices.flat), jax.devices())
    mesh = runkit.make_mesh({"data": 3})
    self.assertEqual(list(mesh.devices.flat), jax.devices()[:3])
    mesh = runkit.make_mesh({"data": None}, jax.devices()[2:5])
    self.assertEqual(list(mesh.devices.flat), jax.devices()[2:5])
    # Three devices do not split in two: the free axis takes what is left whole.
    self.assertEqual(dict(runkit.make_mesh({"data": None, "model": 2},
                                           jax.devices()[:3]).shape),
                     {"data": 1, "model": 2})

  def test_errors_name_the_size_and_its_range(self):
    with self.assertRaisesRegex(ValueError, r"num_devices must be an int in \[1, 8\] "
                                r"\(the available devices\), got 9"):
      runkit.make_mesh({"data": 9}, labels={"data": "num_devices"})
    with self.assertRaisesRegex(ValueError, r"n_data \* 'model' axis size = 4 \* 3 exceeds "
                                r"the 8 available devices"):
      runkit.make_mesh({"data": 4, "model": 3}, labels={"data": "n_data"})
    with self.assertRaisesRegex(ValueError, r"\(the available devices\), got 4"):
      runkit.make_mesh({"data": None, "model": 4}, jax.devices()[:3])
    with self.assertRaisesRegex(ValueError, "n_model must be an int >= 1 or None, got 0"):
      runkit.make_mesh({"data": None, "model": 0}, labels={"model": "n_model"})
    with self.assertRaisesRegex(ValueError, "must be an int >= 1 or None, got True"):
      runkit.make_mesh({"data": True})
    with self.assertRaisesRegex(ValueError, "at most one mesh axis size may be None"):
      runkit.make_mesh({"data": None, "model": None})
    with self.assertRaisesRegex(ValueError, "axes must name at least one mesh axis"):
      runkit.make_mesh({})


if __name__ == "__main__":
  absltest.main()
