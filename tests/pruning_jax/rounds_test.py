"""Tests for the IMP driver (pruning_jax.rounds); its checkpointer is tested in tests/runkit."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from pruning_jax import datasets
from pruning_jax import masks as masks_lib
from pruning_jax import optim
from pruning_jax import rounds
from pruning_jax import train
import runkit

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# LeNet-300-100 on 4x4x1 inputs: 16*300 + 300*100 + 100*10 = 35800 prunable weights.
_PRUNABLE = 35800


def tiny_data(n=64, m=24, seed=0) -> datasets.Dataset:
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (n + m, 4, 4, 1), dtype=np.uint8)
  y = (x.reshape(n + m, -1)[:, :3].argmax(1)).astype(np.int32)
  return datasets.Dataset(x[:n], y[:n], x[n:], y[n:], 10, np.array([0.5], np.float32),
                          np.array([0.3], np.float32), tuple(map(str, range(10))), "tiny")


def tiny_config(**overrides) -> rounds.RoundsConfig:
  """4 steps per round (64 samples, batch 16, 1 epoch), 3 rounds, saved at round ends."""
  settings = dict(model="lenet300100", dataset="tiny",
                  train=train.lottery_config("lenet300100", batch_size=16, epochs=1),
                  cycles=2, eval_batch_size=8, keep_checkpoints=2)
  settings.update(overrides)
  return rounds.RoundsConfig(**settings)


def child_main(out_dir: str, kill_at: int) -> None:
  """Entry point of the killed child process: SIGKILL itself after global step kill_at."""
  def hook(round_, step, global_step):
    del round_, step
    if global_step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  rounds.run_rounds(tiny_config(save_every_steps=3), out_dir, data=tiny_data(), hooks=[hook],
                    progress=False)


def _run_child(out_dir, kill_at):
  code = ("import sys; from tests.pruning_jax import rounds_test; "
          "rounds_test.child_main(sys.argv[1], int(sys.argv[2]))")
  return subprocess.run([sys.executable, "-c", code, out_dir, str(kill_at)], cwd=_ROOT,
                        capture_output=True, text=True, timeout=120)


def _tmp(test) -> str:
  holder = tempfile.TemporaryDirectory()
  test.addCleanup(holder.cleanup)
  return holder.name


def _read(path):
  with open(path) as fh:
    return fh.read()


def _without_times(log: str) -> str:
  """The metrics log without its wall-time lines, the only ones a rerun changes."""
  return "".join(l + "\n" for l in log.splitlines() if json.loads(l)["kind"] != "time")


def _assert_same_run(test, a, b):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  chex.assert_trees_all_equal(a.masks, b.masks)
  test.assertEqual(a.history, b.history)


class RunRoundsTest(parameterized.TestCase):

  def test_sparsity_counts_metrics_and_zeros(self):
    out = _tmp(self)
    result = rounds.run_rounds(tiny_config(), out, data=tiny_data(), progress=False)
    # Hand-computed: cycle 1 removes round(0.2 * 35800) = 7160 (AP: round(0.02 *
    # 35800) = 716), cycle 2 round(0.2 * 28640) = 5728 (AP 573); 22912 remain.
    self.assertEqual([(h.n_remaining_before, h.host_removed, h.ap_removed)
                      for h in result.history], [(35800, 6444, 716), (28640, 5155, 573)])
    self.assertEqual(int(masks_lib.num_remaining(result.masks)), 22912)
    np.testing.assert_allclose([e["sparsity"] for e in result.evals],
                               [0.0, 7160 / _PRUNABLE, 12888 / _PRUNABLE], rtol=1e-6)
    kinds = [json.loads(l)["kind"] for l in _read(os.path.join(out, "metrics.jsonl"))
             .splitlines()]
    self.assertEqual(kinds, ["epoch", "time", "eval", "prune"] * 2 + ["epoch", "time", "eval"])
    for e in result.evals:
      self.assertBetween(e["test_accuracy"], 0.0, 1.0)
      self.assertBetween(e["dnr"], 0.0, 1.0)
      self.assertEqual(set(e["layer_dnr"]), {"fc1.relu", "fc2.relu"})
    is_none = lambda x: x is None
    for p, m in zip(jax.tree.leaves(result.params, is_leaf=is_none),
                    jax.tree.leaves(result.masks, is_leaf=is_none)):
      if m is not None:
        np.testing.assert_array_equal(np.asarray(p)[~np.asarray(m)], 0.0)
    self.assertIsNone(result.resumed_from)
    # Rerunning a finished run restores it instead of training again.
    again = rounds.run_rounds(tiny_config(), out, data=tiny_data(), progress=False)
    self.assertEqual(again.resumed_from, 12)  # the end-of-round-2 checkpoint
    _assert_same_run(self, result, again)

  def test_controls_keep_the_cycle_total_and_record_their_settings(self):
    for selection, scope in (("random", "all"), ("most_negative", "all"),
                             ("least_moved", "relu_fed")):
      result = rounds.run_rounds(tiny_config(cycles=1, ap_selection=selection,
                                             ap_scope=scope),
                                 _tmp(self), data=tiny_data(), progress=False)
      info = result.history[0]
      self.assertEqual(info.host_removed + info.ap_removed, 7160)
      self.assertEqual(info.ap_removed + info.ap_shortfall, 716)
    # relu_fed: the first layer (16 x 300 inputs) loses only the host's weights.
    config = tiny_config(cycles=1, ap_scope="relu_fed", ap_rate=0.2, method="random")
    result = rounds.run_rounds(config, _tmp(self), data=tiny_data(), progress=False)
    self.assertEqual(result.history[0].host_removed, result.history[0].ap_shortfall)
    first = np.asarray(result.masks["hidden"][0]["kernel"])
    self.assertTrue(first.all())

  def test_epoch_evaluation_and_round_time_are_logged(self):
    out = _tmp(self)
    rounds.run_rounds(tiny_config(cycles=1, eval_every_epoch=True,
                                  train=train.lottery_config("lenet300100", batch_size=16,
                                                             epochs=2)),
                      out, data=tiny_data(), progress=False)
    lines = [json.loads(l) for l in _read(os.path.join(out, "metrics.jsonl")).splitlines()]
    epochs = [l for l in lines if l["kind"] == "epoch"]
    self.assertLen(epochs, 4)
    for line in epochs:
      self.assertBetween(line["test_accuracy"], 0.0, 1.0)
    evals = [l for l in lines if l["kind"] == "eval"]
    # The last epoch's test accuracy is the round's evaluation.
    self.assertEqual(epochs[-1]["test_accuracy"], evals[-1]["test_accuracy"])
    times = [l for l in lines if l["kind"] == "time"]
    self.assertEqual([l["round"] for l in times], [0, 1])
    self.assertTrue(all(l["train_seconds"] > 0 for l in times))
    for line in evals:
      self.assertEqual(set(line["layer_sparsity"]),
                       {"hidden/0/kernel", "hidden/1/kernel", "head/kernel"})

  def test_batchnorm_recalibration_is_evaluated_beside_the_running_statistics(self):
    data = tiny_data()
    padded = datasets.pad_images(data, 8)
    config = tiny_config(model="resnet20", cycles=1, bn_recalibration_batches=2,
                         train=train.TrainConfig(optimizer="sgd", learning_rate=0.05,
                                                 warmup_steps=0, decay_epochs=(),
                                                 epochs=1, batch_size=16, augment=False))
    result = rounds.run_rounds(config, _tmp(self), data=padded, progress=False)
    for e in result.evals:
      self.assertBetween(e["test_accuracy_bn_recal"], 0.0, 1.0)
      self.assertBetween(e["dnr_bn_recal"], 0.0, 1.0)
    # Without BatchNorm there is nothing to recalibrate and nothing is reported.
    plain = rounds.run_rounds(tiny_config(cycles=0, bn_recalibration_batches=2), _tmp(self),
                              data=data, progress=False)
    self.assertNotIn("test_accuracy_bn_recal", plain.evals[0])

  def test_host_alone_without_ap(self):
    result = rounds.run_rounds(tiny_config(ap_rate=None, cycles=1), _tmp(self),
                               data=tiny_data(), progress=False)
    self.assertEqual(result.history[0].ap_removed, 0)
    self.assertEqual(result.history[0].host_removed, 7160)

  def test_every_host_method_gets_its_inputs_and_removes_the_exact_count(self):
    config = tiny_config(synflow_iterations=2)
    run = rounds._Run(config, _tmp(self), tiny_data(), (), False)
    start = run.state
    for method in ("random", "snip", "grasp", "synflow"):  # the methods needing inputs
      run.config, run.state, run.round, run.history = (
          dataclasses.replace(config, method=method), start, 0, [])
      run.prune_and_rewind()
      info = run.history[0]
      # round(0.2 * 35800) = 7160 in total, round(0.02 * 35800) = 716 of them by AP.
      self.assertEqual((info.host_removed + info.ap_removed, info.ap_removed), (7160, 716),
                       msg=method)
      self.assertEqual(int(masks_lib.num_remaining(run.masks())), _PRUNABLE - 7160)
      self.assertEqual((run.round, int(run.state.step)), (1, 0))
    run.ckpt.close()

  def test_data_parallel_round(self):
    result = rounds.run_rounds(tiny_config(cycles=0, num_devices=2), _tmp(self),
                               data=tiny_data(), progress=False)
    leaf = jax.tree.leaves(result.params)[0]
    self.assertEqual(len(leaf.sharding.device_set), 2)
    self.assertBetween(result.evals[0]["test_accuracy"], 0.0, 1.0)

  @parameterized.parameters(0, 2)
  def test_rewinding_target(self, rewind_step):
    out = _tmp(self)
    config = tiny_config(cycles=1, rewind_step=rewind_step)
    rounds.run_rounds(config, out, data=tiny_data(), progress=False)
    run = rounds._Run(config, out, tiny_data(), (), False)
    record, meta = run.ckpt.restore(run.record())  # round 1, trained
    self.assertEqual((meta["round"], meta["phase"]), (1, "trained"))
    masks = optim.get_masks(record["state"].opt_state)
    chex.assert_trees_all_equal(record["start_params"],
                                masks_lib.apply_masks(record["rewind_params"], masks))
    same_as_init = jax.tree.map(np.array_equal, record["rewind_params"],
                                record["init_params"])
    self.assertEqual(all(jax.tree.leaves(same_as_init)), rewind_step == 0)
    run.ckpt.close()

  def test_sigkill_and_restart_is_bitwise_equal_to_an_uninterrupted_run(self):
    killed = _tmp(self)
    # Checkpoints: every 3 global steps and at each round end (steps 4, 8, 12). The child
    # dies mid round 1, one step after the checkpoint at step 6; the restart replays
    # step 7 with the restored data position, masks and rewind target. It is then
    # stopped again right after the end-of-round-1 checkpoint (step 8), and the last
    # restart replays the pruning of round 1 before training round 2.
    proc = _run_child(killed, kill_at=7)
    self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr[-2000:])

    def crash(round_, step, global_step):
      del round_, step
      if global_step == 9:
        raise KeyboardInterrupt

    with self.assertRaises(KeyboardInterrupt):
      rounds.run_rounds(tiny_config(save_every_steps=3), killed, data=tiny_data(),
                        hooks=[crash], progress=False)
    resumed = rounds.run_rounds(tiny_config(save_every_steps=3), killed, data=tiny_data(),
                                progress=False)
    self.assertEqual(resumed.resumed_from, 8)
    clean_dir = _tmp(self)
    clean = rounds.run_rounds(tiny_config(save_every_steps=3), clean_dir, data=tiny_data(),
                              progress=False)
    _assert_same_run(self, resumed, clean)
    self.assertEqual(_without_times(_read(os.path.join(killed, "metrics.jsonl"))),
                     _without_times(_read(os.path.join(clean_dir, "metrics.jsonl"))))

  def test_shared_round0_matches_a_full_run(self):
    source, shared, full = (_tmp(self) for _ in range(3))
    rounds.run_rounds(tiny_config(ap_rate=None), source, data=tiny_data(), progress=False)
    a = rounds.run_rounds(tiny_config(), shared, data=tiny_data(), progress=False,
                          round0_from=source)
    b = rounds.run_rounds(tiny_config(), full, data=tiny_data(), progress=False)
    _assert_same_run(self, a, b)
    self.assertEqual(a.evals, b.evals)
    with self.assertRaisesRegex(ValueError, r"differs in \['seed'\]"):
      rounds.run_rounds(tiny_config(seed=1), _tmp(self),
                        data=tiny_data(), progress=False, round0_from=source)
    with self.assertRaisesRegex(ValueError, "holds no run"):
      rounds.run_rounds(tiny_config(), _tmp(self), data=tiny_data(), progress=False,
                        round0_from=_tmp(self))

    def stop(round_, step, global_step):
      del round_, step
      if global_step == 2:
        raise KeyboardInterrupt

    unfinished = _tmp(self)
    with self.assertRaises(KeyboardInterrupt):
      rounds.run_rounds(tiny_config(), unfinished, data=tiny_data(), hooks=[stop],
                        progress=False)
    with self.assertRaisesRegex(ValueError, r"has not finished round 0 \(no checkpoint 4\)"):
      rounds.run_rounds(tiny_config(), _tmp(self), data=tiny_data(), progress=False,
                        round0_from=unfinished)

  def test_non_finite_loss_names_round_step_and_checkpoint(self):
    out = _tmp(self)
    config = tiny_config(train=train.TrainConfig(
        optimizer="sgd", learning_rate=1e30, momentum=0.0, weight_decay=0.0,
        warmup_steps=0, decay_epochs=(), epochs=1, batch_size=16, augment=False))
    pattern = r"non-finite loss .* at round 0, step \d; the last good checkpoint is .*/0 "
    with self.assertRaisesRegex(rounds.NonFiniteLossError, pattern):
      rounds.run_rounds(config, out, data=tiny_data(), progress=False)
    checkpoints = runkit.Checkpointer(os.path.join(out, "checkpoints"))
    self.assertEqual(checkpoints.steps(), [0])
    checkpoints.close()
    with self.assertRaisesRegex(rounds.NonFiniteLossError, pattern):
      rounds.run_rounds(config, out, data=tiny_data(), progress=False)

  def test_corrupted_checkpoint_is_reported(self):
    out = _tmp(self)
    rounds.run_rounds(tiny_config(cycles=0), out, data=tiny_data(), progress=False)
    meta_file = os.path.join(out, "checkpoints", "4", "meta", "metadata")
    meta = json.loads(_read(meta_file))
    meta["_sha256"] = "0" * 64
    with open(meta_file, "w") as fh:
      json.dump(meta, fh)
    with self.assertRaisesRegex(runkit.CheckpointError, r"checkpoints/4 is damaged.*delete"):
      rounds.run_rounds(tiny_config(cycles=0), out, data=tiny_data(), progress=False)
    state_dir = os.path.join(out, "checkpoints", "4", "state")
    for root, _, files in os.walk(state_dir):
      for name in files:
        with open(os.path.join(root, name), "wb") as fh:
          fh.write(b"garbage")
    with self.assertRaisesRegex(runkit.CheckpointError, r"checkpoints/4 is unreadable"):
      rounds.run_rounds(tiny_config(cycles=0), out, data=tiny_data(), progress=False)

  def test_other_configuration_in_out_dir_is_refused(self):
    out = _tmp(self)
    rounds.run_rounds(tiny_config(cycles=0), out, data=tiny_data(), progress=False)
    with self.assertRaisesRegex(
        runkit.ConfigMismatchError,
        r"differ from this run's: method: 'magnitude' there, 'lamp' now"):
      rounds.run_rounds(tiny_config(cycles=0, method="lamp"), out, data=tiny_data(),
                        progress=False)

  @parameterized.parameters(
      (dict(model="resnet99"), "model must be one of"),
      (dict(method="obd"), "method must be one of"),
      (dict(cycles=-1), "cycles must be an int >= 0, got -1"),
      (dict(ap_rate=0.5), "ap_rate must not exceed rate"),
      (dict(num_devices=3), "batch_size=16 must be a multiple of num_devices=3"),
      (dict(eval_batch_size=12, num_devices=8), "eval_batch_size=12 must be a multiple"),
      (dict(rewind_step=-1), "rewind_step must be an int >= 0"),
      (dict(ap_selection="largest"), "ap_selection must be one of"),
      (dict(ap_scope="first"), "ap_scope must be one of"),
      (dict(bn_recalibration_batches=-1), "bn_recalibration_batches must be an int >= 0"))
  def test_bad_config(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      tiny_config(**overrides)

  def test_bad_runtime_settings(self):
    with self.assertRaisesRegex(ValueError, r"rewind_step=4 must be below the steps of a "
                                r"round \(4\)"):
      rounds.run_rounds(tiny_config(rewind_step=4), _tmp(self),
                        data=tiny_data(), progress=False)
    with self.assertRaisesRegex(ValueError, "train_subset=65 and test_subset=0 must not"):
      rounds.run_rounds(tiny_config(train_subset=65), _tmp(self),
                        data=tiny_data(), progress=False)


if __name__ == "__main__":
  absltest.main()
