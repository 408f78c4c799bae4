"""Tests for runkit.configs: config records, their differences and a run's config.json."""

import dataclasses
import json
import os
import tempfile

from absl.testing import absltest

import runkit


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_sae: int = 16
  dtype: str = "float32"
  shape: tuple = (2, 3)
  scale: float | None = None


@dataclasses.dataclass(frozen=True)
class OptConfig:
  learning_rate: float = 1e-3


def _tmp(test) -> str:
  holder = tempfile.TemporaryDirectory()
  test.addCleanup(holder.cleanup)
  return holder.name


class ConfigRecordTest(absltest.TestCase):

  def test_record_is_keyed_by_class_and_json_able(self):
    record = runkit.config_record(ModelConfig(), OptConfig())
    self.assertEqual(record, {
        "ModelConfig": {"d_sae": 16, "dtype": "float32", "shape": "(2, 3)", "scale": None},
        "OptConfig": {"learning_rate": 1e-3}})
    self.assertEqual(json.loads(json.dumps(record)), record)
    with self.assertRaisesRegex(TypeError, r"configs\[1\] must be a dataclass instance"):
      runkit.config_record(ModelConfig(), {"d_sae": 1})
    with self.assertRaisesRegex(TypeError, r"configs\[0\] must be a dataclass instance"):
      runkit.config_record(ModelConfig)


class ConfigDifferencesTest(absltest.TestCase):

  def test_differing_fields_are_named_with_both_values(self):
    found = runkit.config_record(ModelConfig(), OptConfig())
    expected = runkit.config_record(ModelConfig(d_sae=32), OptConfig(learning_rate=2e-3))
    self.assertEqual(
        [str(d) for d in runkit.config_differences(found, expected)],
        ["ModelConfig.d_sae: 16 there, 32 now",
         "OptConfig.learning_rate: 0.001 there, 0.002 now"])
    self.assertEqual(runkit.config_differences(found, found), [])
    d = runkit.config_differences(found, expected)[0]
    self.assertEqual((d.path, d.there, d.now), ("ModelConfig.d_sae", 16, 32))

  def test_absent_classes_and_fields(self):
    record = runkit.config_record(ModelConfig())
    both = runkit.config_record(ModelConfig(), OptConfig())
    self.assertEqual([str(d) for d in runkit.config_differences(record, both)],
                     ["OptConfig: absent there"])
    self.assertEqual([str(d) for d in runkit.config_differences(both, record)],
                     ["OptConfig: absent now"])
    self.assertEqual([str(d) for d in runkit.config_differences(None, record)],
                     ["ModelConfig: absent there"])
    newer = {"ModelConfig": dict(record["ModelConfig"], bias=True)}
    (d,) = runkit.config_differences(record, newer)
    self.assertIs(d.there, runkit.ABSENT)
    self.assertEqual(str(d), "ModelConfig.bias: <absent> there, True now")

  def test_flat_settings_ignored_keys_and_json_forms(self):
    saved = {"seed": 0, "method": "magnitude", "data_dir": "/a",
             "train": {"epochs": 2, "decay_epochs": [1]}}
    new = {"seed": 1, "method": "magnitude", "data_dir": "/b",
           "train": {"epochs": 3, "decay_epochs": (1,)}}  # a tuple equals its JSON list
    diff = runkit.config_differences(saved, new, ignore=("data_dir",))
    self.assertEqual([d.path for d in diff], ["seed", "train.epochs"])
    self.assertEqual([d.path for d in runkit.config_differences(saved, new,
                                                                ignore=("data_dir", "train"))],
                     ["seed"])
    # A value replaced by a dict (or back) is one difference, not a walk into it.
    self.assertEqual([str(d) for d in runkit.config_differences({"a": 1}, {"a": {"b": 1}})],
                     ["a: 1 there, {'b': 1} now"])

  def test_mismatch_is_a_checkpoint_error_and_a_value_error(self):
    self.assertTrue(issubclass(runkit.ConfigMismatchError, runkit.CheckpointError))
    self.assertTrue(issubclass(runkit.ConfigMismatchError, ValueError))


class ConfigFileTest(absltest.TestCase):

  def test_write_read_and_refuse_other_settings(self):
    run = _tmp(self)
    self.assertFalse(runkit.check_config(run, {"seed": 0}))
    runkit.write_config(run, {"seed": 0, "data_dir": "/a"}, ignore=("data_dir",))
    self.assertEqual(runkit.read_config(run), {"seed": 0, "data_dir": "/a"})
    with open(runkit.config_path(run)) as fh:
      self.assertEqual(fh.read(), '{\n  "data_dir": "/a",\n  "seed": 0\n}\n')
    self.assertTrue(runkit.check_config(run, {"seed": 0, "data_dir": "/b"}, ("data_dir",)))
    # Ignored keys may change and are then recorded.
    runkit.write_config(run, {"seed": 0, "data_dir": "/b"}, ignore=("data_dir",))
    self.assertEqual(runkit.read_config(run)["data_dir"], "/b")
    for error in (runkit.ConfigMismatchError, ValueError):
      with self.assertRaisesRegex(
          error, r"run folder .* was written with configs that differ from this run's: "
          r"seed: 0 there, 1 now\. Use another run folder, or the same configs"):
        runkit.write_config(run, {"seed": 1, "data_dir": "/b"}, ignore=("data_dir",))
    self.assertEqual(runkit.read_config(run)["seed"], 0)

  def test_an_equal_config_file_is_left_as_it_was_written(self):
    run = _tmp(self)
    # As older pruning_jax versions wrote it: insertion order, no final newline.
    text = json.dumps({"seed": 0, "method": "lamp"}, indent=2)
    with open(runkit.config_path(run), "w") as fh:
      fh.write(text)
    runkit.write_config(run, {"method": "lamp", "seed": 0})
    with open(runkit.config_path(run)) as fh:
      self.assertEqual(fh.read(), text)
    self.assertFalse(os.path.exists(runkit.config_path(run) + ".tmp"))

  def test_missing_or_broken_config(self):
    run = _tmp(self)
    with self.assertRaisesRegex(ValueError, "holds no run"):
      runkit.read_config(run)
    with open(runkit.config_path(run), "w") as fh:
      fh.write("{")
    with self.assertRaisesRegex(ValueError, "config.json is not valid JSON"):
      runkit.read_config(run)


if __name__ == "__main__":
  absltest.main()
