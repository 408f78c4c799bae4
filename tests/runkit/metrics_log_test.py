"""Tests for runkit.metrics_log.MetricsLog."""

import os
import tempfile

from absl.testing import absltest

import runkit


def _tmp(test) -> str:
  holder = tempfile.TemporaryDirectory()
  test.addCleanup(holder.cleanup)
  return holder.name


class MetricsLogTest(absltest.TestCase):

  def test_metrics_log_resumes_at_a_recorded_length(self):
    log = runkit.MetricsLog(os.path.join(_tmp(self), "metrics.jsonl"))
    self.assertEqual((log.size(), log.read()), (0, []))
    log.append({"kind": "epoch", "b": 1, "a": 2})
    size = log.size()
    log.append({"kind": "eval", "a": 3})
    self.assertEqual(log.read("eval"), [{"kind": "eval", "a": 3}])
    self.assertLen(log.read(), 2)
    log.truncate(size)
    self.assertEqual(log.text(), '{"a": 2, "b": 1, "kind": "epoch"}\n')
    with self.assertRaisesRegex(runkit.CheckpointError, "fewer than the 999 recorded"):
      log.truncate(999)
    log.replace("")
    self.assertEqual(log.size(), 0)

  def test_drop_after_keeps_the_lines_up_to_a_step(self):
    path = os.path.join(_tmp(self), "metrics.jsonl")
    log = runkit.MetricsLog(path)
    log.drop_after(3)  # no file yet: nothing to do
    self.assertFalse(os.path.exists(path))
    with open(path, "w") as fh:  # lines as written before runkit (keys unsorted), a blank
      fh.write('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n\n'
               '{"note": "no step"}\n{"step": 3, "loss": 0.4}\n')
    log.drop_after(2)
    self.assertEqual(log.text(), '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
                                 '{"note": "no step"}\n')
    log.append({"step": 3, "loss": 0.25})
    self.assertEqual([l.get("step") for l in log.read()], [1, 2, None, 3])


if __name__ == "__main__":
  absltest.main()
