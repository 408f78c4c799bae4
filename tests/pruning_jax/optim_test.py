"""Tests for the masked optimizer wrapper (pruning_jax.optim)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pruning_jax import masks as masks_lib
from pruning_jax import optim


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def _at_masks(tree, masks):
  """Leaves of a params-like tree at the prunable positions, in leaf order."""
  is_none = lambda x: x is None
  return [x for x, m in zip(jax.tree.leaves(tree, is_leaf=is_none),
                            jax.tree.leaves(masks, is_leaf=is_none)) if m is not None]


def _setup(seed=0):
  graphdef, params = nnx.split(_MLP(nnx.Rngs(seed)), nnx.Param)
  rng = np.random.default_rng(seed)
  masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.5),
                       masks_lib.init_masks(params))
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)

  def loss_fn(p):
    return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

  return masks_lib.apply_masks(params, masks), masks, loss_fn


def _make_step(loss_fn, tx):
  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _run(step, params, opt_state, n):
  for _ in range(n):
    params, opt_state = step(params, opt_state)
  return params, opt_state


def _pruned_values(params, masks):
  return np.concatenate([np.asarray(p)[~np.asarray(m)] for p, m in
                         zip(_at_masks(params, masks), jax.tree.leaves(masks))])


def _kept_values(params, masks):
  return np.concatenate([np.asarray(p)[np.asarray(m)] for p, m in
                         zip(_at_masks(params, masks), jax.tree.leaves(masks))])


class MaskedOptimizerTest(chex.TestCase):

  @parameterized.named_parameters(
      ("sgd_momentum_decay", optax.chain(optax.add_decayed_weights(5e-4),
                                         optax.sgd(0.1, momentum=0.9)), True),
      ("adam", optax.adam(1e-2), False),
  )
  def test_pruned_weights_stay_exactly_zero(self, inner, decays):
    params, masks, loss_fn = _setup()
    tx = optim.masked_optimizer(inner, masks)
    opt_state = tx.init(params)
    self.assertIsInstance(opt_state, optim.MaskedState)
    trained, _ = _run(_make_step(loss_fn, tx), params, opt_state, 200)
    pruned = _pruned_values(trained, masks)
    self.assertGreater(pruned.size, 20)
    self.assertTrue(np.all(pruned == 0.0))
    changed = _kept_values(trained, masks) != _kept_values(params, masks)
    # Kept weights of units cut off by the masks (or dead ReLUs) get exactly zero gradient,
    # so Adam leaves them alone; every other kept weight must move. Weight decay moves all.
    has_grad = _kept_values(jax.grad(loss_fn)(params), masks) != 0.0
    self.assertGreater(has_grad.mean(), 0.5)
    self.assertTrue(np.all(changed[has_grad]))
    self.assertEqual(bool(np.all(changed)), decays)
    # Biases are not prunable: they train freely.
    self.assertFalse(np.array_equal(trained["out"]["bias"], params["out"]["bias"]))
    self.assertLess(float(loss_fn(trained)), float(loss_fn(params)))

  def test_prune_mid_training_with_momentum(self):
    params, masks, loss_fn = _setup(seed=1)
    tx = optim.masked_optimizer(optax.chain(optax.add_decayed_weights(5e-4),
                                            optax.sgd(0.1, momentum=0.9)), masks)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(_make_step(loss_fn, tx).__wrapped__, n=1))
    params, opt_state = _run(step, params, tx.init(params), 50)
    scores = jax.tree.map(jnp.abs, params)
    new_masks = masks_lib.prune_lowest(scores, masks, int(masks_lib.num_remaining(masks)) // 2)
    newly = [np.asarray(m) & ~np.asarray(n) for m, n in
             zip(jax.tree.leaves(masks), jax.tree.leaves(new_masks))]
    trace = opt_state.inner_state[1][0].trace  # sgd momentum buffer, shaped like params
    momentum_at_newly = np.concatenate([np.asarray(t)[n] for t, n in
                                        zip(_at_masks(trace, masks), newly)])
    self.assertTrue(np.all(momentum_at_newly != 0.0))

    params, opt_state = optim.prune_params_and_state(params, opt_state, new_masks)
    self.assertTrue(np.all(_pruned_values(params, new_masks) == 0.0))
    before = _kept_values(params, new_masks)
    params, opt_state = _run(step, params, opt_state, 50)  # same program, new mask values
    self.assertTrue(np.all(_pruned_values(params, new_masks) == 0.0))
    self.assertTrue(np.all(_kept_values(params, new_masks) != before))
    chex.assert_trees_all_equal(optim.get_masks(opt_state), new_masks)

  def test_masks_found_in_nested_state(self):
    params, masks, _ = _setup()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optim.masked_optimizer(optax.sgd(0.1), masks))
    opt_state = tx.init(params)
    chex.assert_trees_all_equal(optim.get_masks(opt_state), masks)
    flipped = jax.tree.map(jnp.logical_not, masks)
    chex.assert_trees_all_equal(optim.get_masks(optim.set_masks(opt_state, flipped)), flipped)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, opt_state, params)
    # Masked entries get no update even though every gradient is 1.
    self.assertTrue(np.all(_pruned_values(updates, masks) == 0.0))
    self.assertTrue(np.all(_kept_values(updates, masks) < 0.0))

  def test_errors(self):
    params, masks, _ = _setup()
    tx = optim.masked_optimizer(optax.sgd(0.1), masks)
    opt_state = tx.init(params)
    with self.assertRaisesRegex(ValueError, "exactly one MaskedState.*found 0"):
      optim.get_masks(optax.sgd(0.1).init(params))
    bad = jax.tree.map(lambda m: m, masks)
    bad["out"]["kernel"].set_value(jnp.ones((2, 8), bool))
    with self.assertRaisesRegex(ValueError, "'out/kernel'"):
      optim.set_masks(opt_state, bad)
    with self.assertRaisesRegex(ValueError, "'out/kernel'"):
      optim.prune_params_and_state(params, opt_state, bad)
    with self.assertRaisesRegex(ValueError, "'hidden/kernel'"):
      tx.update({"hidden": {"kernel": jnp.ones((4, 8))}}, opt_state)
    fewer = jax.tree.map(lambda m: m, masks)
    fewer["out"]["kernel"].set_value(None)
    with self.assertRaisesRegex(ValueError, "'out/kernel' is not None in the current masks"):
      optim.set_masks(opt_state, fewer)
    with self.assertRaisesRegex(ValueError, "no prunable leaf"):
      optim.masked_optimizer(optax.sgd(0.1), {"w": None})
    with self.assertRaisesRegex(ValueError, "'<missing>' in params vs 'out/bias' in masks"):
      optim.masked_optimizer(optax.sgd(0.1), masks).init({"hidden": params["hidden"]})


if __name__ == "__main__":
  absltest.main()
