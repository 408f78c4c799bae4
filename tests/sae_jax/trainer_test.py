"""The SAE training loop: checkpoints, bitwise resume after SIGKILL, non-finite stops."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
from absl.testing import absltest

from sae_jax import checkpoint
from sae_jax import model
from sae_jax import train
from sae_jax import trainer
from sae_jax.data import synthetic

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from sae_jax import model, train, trainer
    from sae_jax.data import synthetic
    run_dir, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = model.SAEConfig(d_model=8, d_sae=32, allocation="mutual_choice", k=3)
    tcfg = train.TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=12,
                             aux_loss="aux_zipf")
    rcfg = trainer.RunConfig(steps=12, checkpoint_every=3, log_every=1, n_data=2, n_model=2,
                             progress=False)
    data = synthetic.SyntheticBatches(synthetic.SyntheticConfig(d_model=8, num_features=24),
                                      batch_size=32, seed=0)
    def on_step(step):
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    state, _ = trainer.fit(run_dir, cfg, tcfg, rcfg, data, init_sample=data.sample(256),
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
    steps = [json.loads(l)["step"] for l in (tmp / "killed" / "metrics.jsonl").read_text().splitlines()]
    self.assertEqual(steps, list(range(1, 13)))


def _small():
  cfg = model.SAEConfig(d_model=8, d_sae=16, allocation="topk", k=2)
  tcfg = train.TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4)
  rcfg = trainer.RunConfig(steps=4, checkpoint_every=2, log_every=1, n_data=1, n_model=1,
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
    with self.assertRaisesRegex(trainer.NonFiniteError, r"step 3 .*checkpoints/2"):
      trainer.fit(run, cfg, tcfg, rcfg, _NaNAt(data, 4))
    # The checkpoint written before the failure is intact and resumable.
    self.assertEqual(checkpoint.Checkpointer(os.path.join(run, "checkpoints")).latest_step(), 2)
    state, _ = trainer.fit(run, cfg, tcfg, rcfg, data)
    self.assertEqual(int(state.step), 4)

  def test_config_mismatch_is_refused_clearly(self):
    cfg, tcfg, rcfg, data = _small()
    run = self.create_tempdir().full_path
    trainer.fit(run, cfg, tcfg, dataclass_replace(rcfg, steps=2), data)
    other = model.SAEConfig(d_model=8, d_sae=32, allocation="topk", k=2)
    with self.assertRaisesRegex(checkpoint.CheckpointError, "differ from this run"):
      trainer.fit(run, other, tcfg, rcfg, data)

  def test_corrupted_checkpoint_is_reported_with_its_path(self):
    cfg, tcfg, rcfg, data = _small()
    run = pathlib.Path(self.create_tempdir().full_path)
    trainer.fit(run, cfg, tcfg, dataclass_replace(rcfg, steps=2), data)
    for f in (run / "checkpoints" / "2").rglob("*"):
      if f.is_file() and "state" in str(f):
        f.write_bytes(b"garbage")
    with self.assertRaisesRegex(checkpoint.CheckpointError, "checkpoints/2"):
      trainer.fit(run, cfg, tcfg, rcfg, data)


def dataclass_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


if __name__ == "__main__":
  absltest.main()
