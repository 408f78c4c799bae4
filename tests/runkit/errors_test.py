"""The packages' non-finite errors share runkit's base class."""

from absl.testing import absltest

from pruning_jax import rounds
from sae_jax.training import loop
import runkit


class NonFiniteErrorTest(absltest.TestCase):

  def test_package_errors_are_runkit_non_finite_errors(self):
    for error in (loop.NonFiniteError, rounds.NonFiniteLossError):
      self.assertTrue(issubclass(error, runkit.NonFiniteError), error)
      self.assertTrue(issubclass(error, FloatingPointError), error)
      with self.assertRaises(runkit.NonFiniteError):
        raise error("loss became nan at step 3")


if __name__ == "__main__":
  absltest.main()
