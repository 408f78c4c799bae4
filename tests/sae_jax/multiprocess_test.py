"""Two processes on localhost (Gloo CPU collectives) train the same SAE as one process."""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from absl.testing import absltest

WORKER = textwrap.dedent("""
    import os, sys
    out, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from runkit import distributed
    from sae_jax import model
    from sae_jax.training import loop, train_state
    from sae_jax.data import synthetic
    if nproc > 1:
      distributed.initialize(f"localhost:{port}", nproc, pid)
    cfg = model.SAEConfig(d_model=8, d_sae=32, allocation="mutual_choice", k=3)
    tcfg = train_state.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=5)
    rcfg = loop.RunConfig(steps=5, checkpoint_every=5, log_every=1, n_data=4, n_model=1,
                          progress=False)
    data = synthetic.SyntheticBatches(synthetic.SyntheticConfig(d_model=8, num_features=24),
                                      batch_size=64 // nproc, seed=0, process_index=pid,
                                      process_count=nproc)
    state, _ = loop.fit(os.path.join(out, "run"), cfg, tcfg, rcfg, data,
                        init_sample=data.sample(128))
    params = [np.asarray(x.addressable_shards[0].data) if x.is_fully_replicated
              else np.asarray(x) for x in state.params]
    np.savez(os.path.join(out, f"final_{pid}.npz"), *params)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_match_one(self):
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory() as tmp:
      single = subprocess.run([sys.executable, "-c", WORKER, f"{tmp}/one", "0", "1", "0"],
                              env=env, capture_output=True, text=True, timeout=300)
      self.assertEqual(single.returncode, 0, single.stderr[-3000:])
      port = str(_free_port())
      procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"{tmp}/two", str(p), "2", port],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for p in range(2)]
      for p in procs:
        _, err = p.communicate(timeout=300)
        self.assertEqual(p.returncode, 0, err[-3000:])
      one = np.load(f"{tmp}/one/final_0.npz")
      for pid in range(2):
        two = np.load(f"{tmp}/two/final_{pid}.npz")
        for name in one.files:
          np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
