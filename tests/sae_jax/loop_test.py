"""The SAE training loop: checkpoints, bitwise resume after SIGKILL, non-finite stops,
prefetching, run-folder configs."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap
import threading

import jax
import numpy as np
import pytest
from absl.testing import absltest

from sae_jax import model
from sae_jax.data import synthetic
from sae_jax.training import loop
from sae_jax.training import sharding
from sae_jax.training import train_state
import runkit

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from sae_jax import model
    from sae_jax.training import loop, train_state
    from sae_jax.data import synthetic
    run_dir, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = model.SAEConfig(d_model=8, d_sae=32, allocation="mutual_choice", k=3)
    tcfg = train_state.TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=12,
                                   aux_loss="aux_zipf")
    rcfg = loop.RunConfig(steps=12, checkpoint_every=3, log_every=1, n_data=2, n_model=2,
                          progress=False)
    data = synthetic.SyntheticBatches(synthetic.SyntheticConfig(d_model=8, num_features=24),
                                      batch_size=32, seed=0)
    def on_step(step):
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    state, _ = loop.fit(run_dir, cfg, tcfg, rcfg, data, init_sample=data.sample(256),
                        on_step=on_step)
    np.savez(os.path.join(run_dir, "final.npz"), *[np.asarray(x) for x in state.params])
""")


def _run(run_dir, kill_at):
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
  return subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), str(kill_at)], env=env,
                        capture_output=True, text=True, timeout=300)


class ResumeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self._tmp = tempfile.TemporaryDirectory()
    self.addCleanup(self._tmp.cleanup)

  def test_sigkill_and_restart_is_bitwise_equal_to_uninterrupted(self):
    tmp = pathlib.Path(self._tmp.name)
    straight = _run(tmp / "straight", kill_at=-1)
    self.assertEqual(straight.returncode, 0, straight.stderr[-2000:])
    killed = _run(tmp / "killed", kill_at=7)  # after the step-6 checkpoint
    self.assertEqual(killed.returncode, -9, killed.stderr[-2000:])
    self.assertFalse((tmp / "killed" / "final.npz").exists())
    resumed = _run(tmp / "killed", kill_at=-1)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
    a, b = np.load(tmp / "straight" / "final.npz"), np.load(tmp / "killed" / "final.npz")
    for name in a.files:
      np.testing.assert_array_equal(a[name], b[name])
    # The metric log holds each step once, even though steps 7 ran twice.
    log = (tmp / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(l)["step"] for l in log]
    self.assertEqual(steps, list(range(1, 13)))


def _small():
  cfg = model.SAEConfig(d_model=8, d_sae=16, allocation="topk", k=2)
  tcfg = train_state.TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4)
  rcfg = loop.RunConfig(steps=4, checkpoint_every=2, log_every=1, n_data=1, n_model=1,
                        progress=False)
  data = synthetic.SyntheticBatches(synthetic.SyntheticConfig(d_model=8, num_features=12), 16)
  return cfg, tcfg, rcfg, data


class _NaNAt:
  def __init__(self, inner, at):
    self.inner, self.at, self.i = inner, at, 0

  def __next__(self):
    x = next(self.inner)
    self.i += 1
    return x * np.nan if self.i == self.at else x

  def state(self):
    return self.inner.state()

  def restore(self, s):
    self.inner.restore(s)


class FailureTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self._tmp = tempfile.TemporaryDirectory()
    self.addCleanup(self._tmp.cleanup)
    self._n = 0

  def create_tempdir(self):
    self._n += 1
    path = pathlib.Path(self._tmp.name) / str(self._n)
    path.mkdir()
    return type("TempDir", (), {"full_path": str(path)})

  def test_non_finite_batch_names_step_and_checkpoint(self):
    cfg, tcfg, rcfg, data = _small()
    run = self.create_tempdir().full_path
    with self.assertRaisesRegex(loop.NonFiniteError, r"step 3 .*checkpoints/2"):
      loop.fit(run, cfg, tcfg, rcfg, _NaNAt(data, 4))
    # The checkpoint written before the failure is intact and resumable.
    self.assertEqual(runkit.Checkpointer(os.path.join(run, "checkpoints")).latest_step(), 2)
    state, _ = loop.fit(run, cfg, tcfg, rcfg, data)
    self.assertEqual(int(state.step), 4)

  def test_config_mismatch_is_refused_clearly(self):
    cfg, tcfg, rcfg, data = _small()
    run = pathlib.Path(self.create_tempdir().full_path)
    loop.fit(run, cfg, tcfg, dataclass_replace(rcfg, steps=2), data)
    before = _folder_bytes(run)
    other = model.SAEConfig(d_model=8, d_sae=32, allocation="topk", k=2)
    # A ValueError and a CheckpointError (tests/runkit/configs_test.py).
    with self.assertRaisesRegex(
        runkit.ConfigMismatchError, r"differ from this run.*SAEConfig\.d_sae: 16 there, 32 "
        "now.*another run folder, or the same configs"):
      loop.fit(run, other, tcfg, rcfg, data)
    self.assertEqual(_folder_bytes(run), before)  # refused before any work

  def test_corrupted_checkpoint_is_reported_with_its_path(self):
    cfg, tcfg, rcfg, data = _small()
    run = pathlib.Path(self.create_tempdir().full_path)
    loop.fit(run, cfg, tcfg, dataclass_replace(rcfg, steps=2), data)
    for f in (run / "checkpoints" / "2").rglob("*"):
      if f.is_file() and "state" in str(f):
        f.write_bytes(b"garbage")
    with self.assertRaisesRegex(runkit.CheckpointError, "checkpoints/2"):
      loop.fit(run, cfg, tcfg, rcfg, data)


def dataclass_replace(obj, **kw):
  return dataclasses.replace(obj, **kw)


def _folder_bytes(path: pathlib.Path) -> dict:
  return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
          if f.is_file()}


def _restore_target(cfg, tcfg):
  abstract = jax.eval_shape(lambda: train_state.init_train_state(jax.random.key(0), cfg, tcfg))
  shardings = sharding.state_shardings(abstract, sharding.make_mesh(1, 1))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "sae-prefetch" and t.is_alive()]


class _Counting:
  """Endless host batches; batch i is filled with i."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return np.full((4, 8), self.i - 1, np.float32)

  def state(self):
    return {"i": self.i}

  def restore(self, s):
    self.i = s["i"]


class _FailAt:
  """Raises ``error`` instead of returning batch number ``at`` (1-based)."""

  def __init__(self, inner, at, error):
    self.inner, self.at, self.error, self.i = inner, at, error, 0

  def __next__(self):
    self.i += 1
    if self.i == self.at:
      raise self.error
    return next(self.inner)

  def state(self):
    return self.inner.state()

  def restore(self, s):
    self.inner.restore(s)


class _ScaleAt(_NaNAt):
  """Multiplies batch number ``at`` by 1e30: finite, but its squared norm overflows."""

  def __next__(self):
    x = next(self.inner)
    self.i += 1
    return x * np.float32(1e30) if self.i == self.at else x


def test_prefetcher_yields_the_source_order_and_the_position_after_each_batch():
  source, reference = _Counting(), _Counting()
  with loop.Prefetcher(source, lambda x: x * 2, count=7, depth=2) as prefetcher:
    items = list(prefetcher)
  assert not _prefetch_threads()
  assert len(items) == 7
  for item in items:
    np.testing.assert_array_equal(item.array, next(reference) * 2)
    assert item.position == reference.state()
    assert item.rows == 4
  assert source.state() == {"i": 7}  # never read beyond what was asked for


def test_prefetcher_stops_its_thread_when_closed_early():
  with loop.Prefetcher(_Counting(), lambda x: x, count=1000, depth=2) as prefetcher:
    next(prefetcher)
  assert not _prefetch_threads()


def test_fit_consumes_batches_in_source_order(tmp_path):
  """Prefetched training is bitwise equal to stepping over the batches by hand."""
  cfg, tcfg, rcfg, data = _small()
  state, _ = loop.fit(tmp_path / "run", cfg, tcfg, rcfg, data)
  assert not _prefetch_threads()
  assert data.state() == {"index": rcfg.steps}  # read once per step, as without prefetch
  _, _, _, by_hand = _small()
  mesh = sharding.make_mesh(1, 1)
  expected = sharding.init_sharded_state(jax.random.key(rcfg.seed), cfg, tcfg, mesh)
  step_fn = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: expected))
  for _ in range(rcfg.steps):
    expected, _ = step_fn(expected, jax.device_put(next(by_hand),
                                                   sharding.batch_sharding(mesh)))
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("log_every,checkpoint_every", [(3, 4), (10, 2)])
@pytest.mark.parametrize("corrupt,message", [(_NaNAt, "batch for step 5 holds non-finite"),
                                             (_ScaleAt, "loss became (nan|inf) at step 5")])
def test_non_finite_step_stops_within_a_check_and_keeps_the_last_good_checkpoint(
    tmp_path, log_every, checkpoint_every, corrupt, message):
  cfg, tcfg, rcfg, data = _small()
  rcfg = dataclasses.replace(rcfg, steps=16, log_every=log_every,
                             checkpoint_every=checkpoint_every)
  tcfg = dataclasses.replace(tcfg, total_steps=16)
  run = tmp_path / "run"
  ran = []
  with pytest.raises(loop.NonFiniteError,
                     match=rf"{message}.*seen at step 6\b.*{re.escape(str(run))}/checkpoints/4 "):
    loop.fit(run, cfg, tcfg, rcfg, corrupt(data, 6), on_step=ran.append)
  assert max(ran) <= 5 + min(log_every, checkpoint_every)
  assert not _prefetch_threads()
  ckpt = runkit.Checkpointer(run / "checkpoints")
  # Nothing saved after the bad step 5; the good checkpoints are still there.
  assert ckpt.steps() == list(range(checkpoint_every, 5, checkpoint_every))
  restored, meta = ckpt.restore(_restore_target(cfg, tcfg), 4)
  ckpt.close()
  assert int(restored.step) == 4 and meta["data"] == {"index": 4}
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
  state, _ = loop.fit(run, cfg, tcfg, rcfg, data)
  assert int(state.step) == 16


def test_resume_is_announced(tmp_path, capsys):
  cfg, tcfg, rcfg, data = _small()
  run = tmp_path / "run"
  loop.fit(run, cfg, tcfg, dataclasses.replace(rcfg, steps=2), data)
  assert "resuming" not in capsys.readouterr().out
  loop.fit(run, cfg, tcfg, rcfg, data)
  assert (f"resuming {run} from step 2 (checkpoint {run}/checkpoints/2)"
          in capsys.readouterr().out)


def _lines(run):
  return {l["step"]: l for l in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


class _Stop(Exception):
  pass


def test_lines_hold_means_since_the_previous_line_and_resume_keeps_them(tmp_path):
  cfg, tcfg, rcfg, data = _small()
  rcfg = dataclasses.replace(rcfg, steps=9, checkpoint_every=2)
  tcfg = dataclasses.replace(tcfg, total_steps=9)
  loop.fit(tmp_path / "every", cfg, tcfg, rcfg, _small()[3])  # a line at every step
  every = _lines(tmp_path / "every")
  straight_cfg = dataclasses.replace(rcfg, log_every=3)
  loop.fit(tmp_path / "straight", cfg, tcfg, straight_cfg, _small()[3])
  straight = _lines(tmp_path / "straight")
  assert sorted(straight) == [3, 6, 9]
  for end in (3, 6, 9):  # the same steps, logged every step: the mean of three lines
    for key in loop.MEAN_KEYS:
      want = np.mean([np.float32(every[s][key]) for s in range(end - 2, end + 1)])
      np.testing.assert_allclose(straight[end][f"{key}_mean"], want, rtol=1e-6)
  assert straight[6]["nmse_mean"] != straight[6]["nmse"]  # a mean, not the last step's value

  def stop_at_5(step):
    if step == 5:  # after the step-4 checkpoint, in the middle of the interval 4-6
      raise _Stop
  with pytest.raises(_Stop):
    loop.fit(tmp_path / "resumed", cfg, tcfg, straight_cfg, _small()[3], on_step=stop_at_5)
  loop.fit(tmp_path / "resumed", cfg, tcfg, straight_cfg, _small()[3])
  assert _lines(tmp_path / "resumed").keys() == straight.keys()
  for step, line in _lines(tmp_path / "resumed").items():
    for key in loop.MEAN_KEYS:
      assert line[f"{key}_mean"] == straight[step][f"{key}_mean"], (step, key)


def test_folder_without_checkpoint_starts_over_only_with_the_same_configs(tmp_path):
  cfg, tcfg, rcfg, data = _small()
  run = tmp_path / "run"
  loop.fit(run, cfg, tcfg, dataclasses.replace(rcfg, steps=2), data)
  for f in sorted((run / "checkpoints").rglob("*"), reverse=True):  # killed before a save
    f.rmdir() if f.is_dir() else f.unlink()
  other = dataclasses.replace(tcfg, learning_rate=2e-3)
  with pytest.raises(ValueError,
                     match=r"TrainConfig\.learning_rate: 0\.001 there, 0\.002 now"):
    loop.fit(run, cfg, other, rcfg, data)
  loop.fit(run, cfg, tcfg, rcfg, data)
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_metrics_without_checkpoint_or_configs_are_refused(tmp_path):
  cfg, tcfg, rcfg, data = _small()
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
  with pytest.raises(ValueError, match="neither a checkpoint nor config.json"):
    loop.fit(tmp_path, cfg, tcfg, rcfg, data)


@pytest.mark.parametrize("error", [OSError("shard 3 is unreadable"), StopIteration("dry")])
def test_batch_source_error_surfaces_in_the_caller(tmp_path, error):
  cfg, tcfg, rcfg, data = _small()
  ran = []
  with pytest.raises(type(error), match=str(error)):
    loop.fit(tmp_path / "run", cfg, tcfg, rcfg, _FailAt(data, 3, error),
             on_step=ran.append)
  assert ran == [1, 2]  # the batches read before the failure were all used
  assert not _prefetch_threads()
  ckpt = runkit.Checkpointer(tmp_path / "run" / "checkpoints")
  assert ckpt.latest_step() == 2
  ckpt.close()


if __name__ == "__main__":
  absltest.main()
