"""Tests for sae_jax.evaluation.export: the SAELens folder layout, round trips and the loader."""

import json
import pathlib
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from sae_jax import model
from sae_jax.evaluation import evaluate
from sae_jax.evaluation import export
from sae_jax.params import SAEParams, tied_init

safetensors_numpy = pytest.importorskip("safetensors.numpy")

D, F = 6, 16


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  p = tied_init(jax.random.key(seed), D, F, dtype)
  return p._replace(b_enc=jnp.asarray(rng.normal(size=F) * 0.1, dtype),
                    b_dec=jnp.asarray(rng.normal(size=D) * 0.3, dtype))


def _x(seed=1, b=9):
  return np.random.default_rng(seed).normal(size=(b, D)).astype(np.float32)


# SAELens's inference encoders (sae_lens/saes/{standard,topk,jumprelu}_sae.py) in NumPy,
# applied to the exported tensors: process_sae_in subtracts b_dec when
# apply_b_dec_to_input, then hidden_pre = sae_in @ W_enc + b_enc.
def _saelens_codes(tensors, cfg_json, x):
  sae_in = x - tensors["b_dec"] * cfg_json["apply_b_dec_to_input"]
  pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
  if cfg_json["architecture"] == "jumprelu":
    return np.maximum(pre, 0) * (pre > tensors["threshold"])
  if cfg_json["architecture"] == "topk":
    k = cfg_json["activation_fn_kwargs"]["k"]
    top = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return codes
  return np.maximum(pre, 0)


def _read(folder):
  return (safetensors_numpy.load_file(str(folder / "sae_weights.safetensors")),
          json.loads((folder / "cfg.json").read_text()))


class ExportTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())

  @parameterized.named_parameters(
      ("topk", "topk", None, "topk"),
      ("relu", "relu", None, "standard"),
      ("mutual_choice_global", "mutual_choice", 0.05, "jumprelu"),
      ("feature_choice_per_feature", "feature_choice",
       np.linspace(-1.0, 0.3, F).astype(np.float32), "jumprelu"))
  def test_round_trip_is_bitwise_and_matches_saelens(self, allocation, threshold, arch):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation=allocation, k=3)
    params = _params()
    folder = export.export_saelens(self.dir / allocation, params, cfg, layer=3, context_size=64,
                                   threshold=threshold)
    loaded, loaded_cfg, loaded_threshold = export.load_exported(folder)
    chex.assert_trees_all_equal(loaded, params)
    self.assertEqual(loaded_cfg, cfg)
    tensors, cfg_json = _read(folder)
    self.assertEqual(cfg_json["architecture"], arch)
    expected = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    if arch == "jumprelu":
      expected["threshold"] = (F,)
      np.testing.assert_array_equal(loaded_threshold,
                                    np.broadcast_to(np.float32(threshold), (F,)))
    else:
      self.assertIsNone(loaded_threshold)
    self.assertEqual({k: v.shape for k, v in tensors.items()}, expected)
    self.assertEqual({v.dtype for v in tensors.values()}, {np.dtype(np.float32)})
    # SAELens computes the same codes from the files as we do from the parameters.
    x = _x()
    if arch == "jumprelu":
      ours, _ = model.encode_thresholded(params, jnp.asarray(x), cfg, threshold)
    else:
      ours = model.forward(params, jnp.asarray(x), cfg).codes
    np.testing.assert_allclose(_saelens_codes(tensors, cfg_json, x), ours, atol=1e-6)

  def test_cfg_json_keys_and_types(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="topk", k=4)
    folder = export.export_saelens(self.dir, _params(), cfg, layer=3, context_size=64,
                                   dataset_path="wikitext")
    _, c = _read(folder)
    self.assertEqual(
        (c["architecture"], c["d_in"], c["d_sae"], c["dtype"], c["device"], c["model_name"]),
        ("topk", D, F, "float32", "cpu", "sentence-transformers/all-MiniLM-L6-v2"))
    # hidden_states[3] is the output of block index 2 after its LayerNorm.
    self.assertEqual((c["hook_name"], c["hook_layer"]),
                     ("blocks.2.hook_normalized_resid_post", 2))
    self.assertEqual((c["context_size"], c["prepend_bos"], c["dataset_path"]),
                     (64, True, "wikitext"))
    self.assertIs(c["apply_b_dec_to_input"], True)
    self.assertEqual(c["normalize_activations"], "none")
    self.assertEqual((c["activation_fn_kwargs"], c["k"], c["activation_fn"]),
                     ({"k": 4}, 4, "topk"))
    self.assertNotIn("sae_lens_version", c)  # Read as the flat pre-6.0 layout.
    own = c["sae_jax"]
    self.assertEqual((own["format_version"], own["layer"], own["normalization"]), (1, 3, None))
    # No source/metadata given: the record keeps the keys (and bytes) of earlier versions.
    self.assertEqual(set(own), {"format_version", "config", "layer", "normalization"})
    self.assertEqual(own["config"], {"d_model": D, "d_sae": F, "allocation": "topk", "k": 4,
                                     "zipf_exponent": 1.0, "select_on": "relu",
                                     "l1_coefficient": 0.0, "dtype": "float32",
                                     "param_dtype": "float32"})

  def test_hook_names(self):
    self.assertEqual(export.hook_name_for_layer(0), "hook_full_embed")
    self.assertEqual(export.hook_name_for_layer(1), "blocks.0.hook_normalized_resid_post")
    self.assertEqual(export.hook_name_for_layer(6), "blocks.5.hook_normalized_resid_post")

  def test_bfloat16_parameters_round_trip(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="batch_topk", k=2.5,
                          param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    params = _params(dtype=jnp.bfloat16)
    folder = export.export_saelens(self.dir, params, cfg, layer=1, context_size=8,
                                   threshold=np.float32(0.125))
    loaded, loaded_cfg, threshold = export.load_exported(folder)
    chex.assert_trees_all_equal(loaded, params)  # Also checks the bfloat16 dtype.
    self.assertEqual(loaded_cfg, cfg)
    np.testing.assert_array_equal(threshold, np.full(F, 0.125, np.float32))

  def test_fold_normalization_golden(self):
    # By hand with d = f = 1: W_enc / 2 = 1, W_dec * 2 = 6, b_dec * 2 + mean = 5.
    params = SAEParams(np.array([[2.0]]), np.array([0.5]), np.array([[3.0]]), np.array([1.0]))
    folded = export.fold_normalization(params, evaluate.Normalization(np.array([3.0]),
                                                                     np.array(2.0)))
    chex.assert_trees_all_equal(folded, SAEParams(np.array([[1.0]], np.float32),
                                                  np.array([0.5], np.float32),
                                                  np.array([[6.0]], np.float32),
                                                  np.array([5.0], np.float32)))

  def test_folded_normalization_runs_on_raw_activations(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="mutual_choice", k=2)
    params, theta = _params(), np.full(F, 0.05, np.float32)
    rng = np.random.default_rng(5)
    norm = {"mean": rng.normal(size=D), "scale": rng.uniform(0.5, 2.0, size=D)}
    folder = export.export_saelens(self.dir, params, cfg, layer=2, context_size=16,
                                   threshold=theta, normalization=norm)
    loaded, _, loaded_theta = export.load_exported(folder)
    self.assertIsNone(export.exported_normalization(folder))
    tensors, c = _read(folder)
    self.assertEqual(c["normalize_activations"], "none")
    self.assertTrue(c["sae_jax"]["normalization"]["folded"])
    h = _x() * 3 + 1
    n = evaluate.as_normalization(norm, D)
    expected_h, expected_codes = evaluate.splice_reconstruction(params, jnp.asarray(h), cfg, n,
                                                                theta)
    codes, _ = model.encode_thresholded(loaded, jnp.asarray(h), cfg, loaded_theta)
    np.testing.assert_allclose(codes, expected_codes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.decode(loaded, codes, cfg), expected_h, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(_saelens_codes(tensors, c, h), expected_codes, rtol=1e-5,
                               atol=1e-5)

  def test_unfolded_rescaling(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="topk", k=2)
    params = _params()
    folder = export.export_saelens(self.dir, params, cfg, layer=2, context_size=16,
                                   normalization={"mean": 0.0, "scale": 4.0}, fold=False)
    _, c = _read(folder)
    self.assertEqual(c["normalize_activations"], "expected_average_only_in")
    loaded, _, _ = export.load_exported(folder)
    chex.assert_trees_all_equal(loaded, params)
    norm = export.exported_normalization(folder)
    np.testing.assert_array_equal(norm.mean, np.zeros(D))
    self.assertEqual(float(norm.scale), 4.0)

  @parameterized.named_parameters(
      ("mc_without_threshold", dict(allocation="mutual_choice"), {},
       "pass threshold=TrainState.threshold"),
      ("topk_with_threshold", {}, dict(threshold=0.1), "threshold must be None for allocation"),
      ("relu_with_threshold", dict(allocation="relu"), dict(threshold=0.1),
       "threshold must be None for allocation='relu'"),
      ("threshold_shape", dict(allocation="feature_choice"), dict(threshold=np.zeros(3)),
       r"threshold must be a scalar or \[d_sae=16\].*\(3,\)"),
      ("threshold_nan", dict(allocation="batch_topk"), dict(threshold=np.nan), "without NaN"),
      ("uncalibrated", dict(allocation="mutual_choice"), dict(threshold=np.full(F, np.inf)),
       "uncalibrated"),
      ("layer", {}, dict(layer=-1), "layer must be an int >= 0; got -1"),
      ("context_size", {}, dict(context_size=0), "context_size must be an int >= 1; got 0"),
      ("params_shape", dict(d_sae=8), {}, r"params.W_enc must have shape \(6, 8\)"),
      ("fold_false_with_mean", {}, dict(normalization={"mean": 1.0, "scale": 2.0}, fold=False),
       "fold=False can only express a pure rescaling"),
      ("bad_normalization", {}, dict(normalization={"scale": 2.0}), "normalization must have"),
      ("mc_without_threshold_no_layer", dict(allocation="feature_choice"),
       dict(layer=None, context_size=None, source="synthbench:cpu"),
       "pass threshold=TrainState.threshold"),
      ("empty_source", {}, dict(source=""), "source must be a non-empty string"),
      ("source_not_str", {}, dict(source=3), "source must be a non-empty string"),
      ("metadata_not_mapping", {}, dict(metadata=[("seed", 0)]), "metadata must be a mapping"),
      ("metadata_key", {}, dict(metadata={0: "a"}), "metadata must be a mapping with str keys"),
      ("metadata_numpy", {}, dict(metadata={"seed": np.int64(0)}), r"\.item\(\)"),
      ("metadata_nan", {}, dict(metadata={"x": float("nan")}), "only JSON values"),
      ("prepend_bos", {}, dict(prepend_bos=1), "prepend_bos must be a bool or None"))
  def test_export_rejects(self, cfg_overrides, overrides, pattern):
    cfg = model.SAEConfig(**(dict(d_model=D, d_sae=F, allocation="topk", k=2) | cfg_overrides))
    kwargs = dict(layer=1, context_size=8) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      export.export_saelens(self.dir / "out", _params(), cfg, **kwargs)
    self.assertFalse((self.dir / "out" / "cfg.json").exists())

  @parameterized.named_parameters(
      ("topk", "topk", None),
      ("mutual_choice", "mutual_choice", 0.05),
      ("feature_choice", "feature_choice", np.linspace(-1.0, 0.3, F).astype(np.float32)))
  def test_export_without_an_lm_layer_round_trips(self, allocation, threshold):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation=allocation, k=3)
    params = _params()
    metadata = {"preset": "cpu", "seed": 0, "n_features": 4096, "zipf": [0.4, 5e-4],
                "tree": {"roots": 128}}
    folder = export.export_saelens(self.dir / allocation, params, cfg, threshold=threshold,
                                   source="synthbench:cpu", metadata=metadata)
    loaded, loaded_cfg, loaded_threshold = export.load_exported(folder)
    chex.assert_trees_all_equal(loaded, params)
    self.assertEqual(loaded_cfg, cfg)
    if threshold is None:
      self.assertIsNone(loaded_threshold)
    else:
      np.testing.assert_array_equal(loaded_threshold,
                                    np.broadcast_to(np.float32(threshold), (F,)))
    tensors, c = _read(folder)
    # Nothing LM-specific is invented; the keys stay (as null) for pre-6.0 SAELens, whose
    # SAEConfig dataclasses require them.
    for key in export.LM_KEYS:
      self.assertIn(key, c)
      self.assertIsNone(c[key], key)
    self.assertEqual(c["dataset_path"], "")
    self.assertNotIn("metadata", c)  # SAELens 6 would read it as its own metadata block.
    text = (folder / "cfg.json").read_text()
    for invented in ("blocks.", "hook_full_embed", "hook_normalized", "MiniLM"):
      self.assertNotIn(invented, text)
    own = c["sae_jax"]
    self.assertEqual((own["layer"], own["source"], own["metadata"]),
                     (None, "synthbench:cpu", metadata))
    self.assertEqual(export.exported_source(folder),
                     {"source": "synthbench:cpu", "metadata": metadata, "layer": None,
                      "model_name": None, "hook_name": None, "context_size": None,
                      "dataset_path": ""})
    # SAELens's encoder still reads the folder.
    x = _x()
    expected = (model.encode_thresholded(params, jnp.asarray(x), cfg, threshold)[0]
                if threshold is not None else model.forward(params, jnp.asarray(x), cfg).codes)
    np.testing.assert_allclose(_saelens_codes(tensors, c, x), expected, atol=1e-6)

  def test_lm_export_may_name_its_source(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="topk", k=2)
    folder = export.export_saelens(self.dir, _params(), cfg, layer=3, context_size=64,
                                   source="minilm:cpu", metadata={"store": "runs/store"})
    _, c = _read(folder)
    self.assertEqual((c["hook_name"], c["context_size"]),
                     ("blocks.2.hook_normalized_resid_post", 64))
    info = export.exported_source(folder)
    self.assertEqual((info["source"], info["metadata"], info["layer"], info["model_name"]),
                     ("minilm:cpu", {"store": "runs/store"}, 3, export.MINILM))

  def test_hook_without_layer(self):
    # A brought store may know its model and hook but not a hidden_states index.
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="relu")
    folder = export.export_saelens(self.dir, _params(), cfg, model_name="gpt2",
                                   hook_name="blocks.8.hook_resid_pre", context_size=128,
                                   prepend_bos=True)
    _, c = _read(folder)
    self.assertEqual((c["model_name"], c["hook_name"], c["hook_layer"], c["context_size"],
                      c["prepend_bos"]), ("gpt2", "blocks.8.hook_resid_pre", None, 128, True))
    self.assertIsNone(c["sae_jax"]["layer"])


# Codes of the exported SAE on raw activations against those of the original parameters on
# normalised ones, computed directly with model.encode / model.encode_thresholded.
_ENCODE_CASES = (
    ("topk", dict(allocation="topk", k=3), None),
    ("topk_raw", dict(allocation="topk", k=3, select_on="raw"), None),
    ("relu", dict(allocation="relu"), None),
    ("batch_topk", dict(allocation="batch_topk", k=2.5), 0.2),
    ("mutual_choice", dict(allocation="mutual_choice", k=3), "per_feature"),
    ("feature_choice", dict(allocation="feature_choice", k=3), "per_feature"),
    ("feature_choice_zipf", dict(allocation="feature_choice_zipf", k=3), "per_feature"),
)


class EncodeExportedTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())
    rng = np.random.default_rng(11)
    self.norm = {"mean": rng.normal(size=D), "scale": rng.uniform(0.5, 2.0, size=D)}
    self.h = (rng.normal(size=(33, D)) * 2 + 1).astype(np.float32)  # Raw activations.

  def _case(self, cfg_kwargs, threshold, seed=3):
    cfg = model.SAEConfig(d_model=D, d_sae=F, **cfg_kwargs)
    params = _params(seed)
    if isinstance(threshold, str):
      threshold = np.random.default_rng(seed).uniform(0.0, 0.4, F).astype(np.float32)
    return cfg, params, threshold

  def _original_codes(self, params, cfg, threshold, x):
    if threshold is None:
      return np.asarray(model.encode(params, jnp.asarray(x), cfg)[0])
    return np.asarray(model.encode_thresholded(params, jnp.asarray(x), cfg, threshold)[0])

  @parameterized.named_parameters(*_ENCODE_CASES)
  def test_codes_equal_the_original_sae_on_normalised_inputs(self, cfg_kwargs, threshold):
    self.assertIn(cfg_kwargs["allocation"], model.ALLOCATIONS)
    cfg, params, threshold = self._case(cfg_kwargs, threshold)
    folder = export.export_saelens(self.dir, params, cfg, threshold=threshold,
                                   normalization=self.norm, source="synthbench:cpu")
    codes = np.asarray(export.encode_exported(folder, self.h))
    n = evaluate.as_normalization(self.norm, D)
    x = (self.h - n.mean) / n.scale
    expected = self._original_codes(params, cfg, threshold, x)
    # Folding rounds W_enc / scale (and b_dec * scale + mean) to float32: tolerance 1e-5,
    # which also catches any flipped entry (a flip moves a code by at least its threshold).
    np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-5)
    self.assertTrue(0 < np.count_nonzero(codes) < codes.size)
    np.testing.assert_array_equal(codes != 0, expected != 0)
    # The loaded tuple gives the same codes as the folder.
    np.testing.assert_array_equal(export.encode_exported(export.load_exported(folder), self.h),
                                  codes)
    # Batch-independent: encoding a subset of rows (in another order) gives the same rows,
    # exactly.
    rows = np.array([30, 2, 17, 5, 0])
    np.testing.assert_array_equal(export.encode_exported(folder, self.h[rows]), codes[rows])
    np.testing.assert_array_equal(export.encode_exported(folder, self.h[7:8]), codes[7:8])

  @parameterized.named_parameters(*_ENCODE_CASES)
  def test_without_normalisation_codes_are_exact(self, cfg_kwargs, threshold):
    cfg, params, threshold = self._case(cfg_kwargs, threshold, seed=4)
    folder = export.export_saelens(self.dir, params, cfg, threshold=threshold)
    np.testing.assert_array_equal(export.encode_exported(folder, self.h),
                                  self._original_codes(params, cfg, threshold, self.h))

  def test_unfolded_rescaling_is_applied_exactly(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="topk", k=3)
    params = _params()
    folder = export.export_saelens(self.dir, params, cfg, fold=False,
                                   normalization={"mean": 0.0, "scale": 4.0})
    expected = self._original_codes(params, cfg, None, (self.h - np.float32(0)) / np.float32(4))
    np.testing.assert_array_equal(export.encode_exported(folder, self.h), expected)
    loaded = export.load_exported(folder)
    np.testing.assert_array_equal(
        export.encode_exported(loaded, self.h,
                               normalization=export.exported_normalization(folder)), expected)
    with self.assertRaisesRegex(ValueError, "normalization must be None with a folder"):
      export.encode_exported(folder, self.h, normalization={"mean": 0.0, "scale": 4.0})

  @parameterized.parameters("batch_topk", "mutual_choice", "feature_choice",
                            "feature_choice_zipf")
  def test_batch_level_allocation_without_threshold_raises(self, allocation):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation=allocation, k=2)
    with self.assertRaisesRegex(ValueError, "pass threshold=TrainState.threshold"):
      export.export_saelens(self.dir, _params(), cfg)
    with self.assertRaisesRegex(ValueError, f"allocation='{allocation}'.*pass "
                                "threshold=TrainState.threshold"):
      export.encode_exported((_params(), cfg, None), self.h)
    with self.assertRaisesRegex(ValueError, "pass threshold=TrainState.threshold"):
      model.inference_codes(_params(), jnp.asarray(self.h), cfg)

  def test_rejects(self):
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="topk", k=2)
    with self.assertRaisesRegex(ValueError, "exported must be a folder path or the"):
      export.encode_exported([_params(), cfg, None], self.h)
    with self.assertRaisesRegex(ValueError, "cfg a model.SAEConfig"):
      export.encode_exported((_params(), {"d_model": D}, None), self.h)
    with self.assertRaisesRegex(ValueError, "threshold must be None for allocation='topk'"):
      export.encode_exported((_params(), cfg, 0.1), self.h)
    with self.assertRaisesRegex(ValueError, r"x must have shape \[b, d_model=6\]"):
      export.encode_exported((_params(), cfg, None), self.h[:, :4])
    with self.assertRaisesRegex(FileNotFoundError, "cfg.json: missing"):
      export.encode_exported(self.dir / "nowhere", self.h)


class LoadTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())
    cfg = model.SAEConfig(d_model=D, d_sae=F, allocation="mutual_choice", k=2)
    export.export_saelens(self.dir, _params(), cfg, layer=1, context_size=8, threshold=0.1)
    self.tensors, self.cfg_json = _read(self.dir)

  def _write(self, tensors=None, cfg_json=None):
    safetensors_numpy.save_file(self.tensors if tensors is None else tensors,
                                str(self.dir / "sae_weights.safetensors"))
    (self.dir / "cfg.json").write_text(json.dumps(self.cfg_json if cfg_json is None
                                                  else cfg_json))

  def test_missing_files(self):
    with self.assertRaisesRegex(FileNotFoundError, "cfg.json: missing"):
      export.load_exported(self.dir / "nowhere")
    (self.dir / "sae_weights.safetensors").unlink()
    with self.assertRaisesRegex(FileNotFoundError, "sae_weights.safetensors: missing"):
      export.load_exported(self.dir)

  def test_rejects_inconsistent_folders(self):
    without = {k: v for k, v in self.tensors.items() if k != "threshold"}
    wide = dict(self.tensors, b_dec=np.zeros(D + 1, np.float32))
    cases = [
        (dict(tensors=without), r"exactly \['W_dec', 'W_enc', 'b_dec', 'b_enc', 'threshold'\]"),
        (dict(tensors=wide), r"tensor b_dec has shape \(7,\).*needs \(6,\)"),
        (dict(cfg_json=self.cfg_json | {"architecture": "gated"}), "architecture must be one of"),
        (dict(cfg_json=self.cfg_json | {"d_sae": "16"}), "d_sae must be an int >= 1"),
        (dict(cfg_json=self.cfg_json | {"normalize_activations": "layer_norm"}),
         "normalize_activations='layer_norm'"),
        (dict(cfg_json=self.cfg_json | {"sae_jax": {"config": {"d_model": D}}}),
         "sae_jax record is not an SAEConfig"),
        (dict(cfg_json=self.cfg_json | {"sae_jax": {"config": {"d_model": D, "d_sae": 8,
                                                                "k": 2}}}),
         r"sae_jax config \(6, 8\) disagrees with d_in=6, d_sae=16"),
        (dict(cfg_json=self.cfg_json | {"sae_jax": {"config": {"d_model": D, "d_sae": F,
                                                                "k": 99}}}),
         r"not an SAEConfig \(SAEConfig.k must be"),
    ]
    for kwargs, pattern in cases:
      self._write(**kwargs)
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        export.load_exported(self.dir)
    (self.dir / "cfg.json").write_text("{not json")
    with self.assertRaisesRegex(ValueError, "corrupt JSON"):
      export.load_exported(self.dir)

  def test_loads_a_folder_saelens_wrote(self):
    # A TopK SAE as SAELens 6 saves it (top-level k, nested meta, no sae_jax record), with
    # apply_b_dec_to_input false.
    rng = np.random.default_rng(7)
    tensors = {"W_enc": rng.normal(size=(D, F)).astype(np.float32),
               "b_enc": rng.normal(size=F).astype(np.float32),
               "W_dec": rng.normal(size=(F, D)).astype(np.float32),
               "b_dec": rng.normal(size=D).astype(np.float32)}
    cfg_json = {"architecture": "topk", "d_in": D, "d_sae": F, "dtype": "float32",
                "device": "cpu", "k": 3, "apply_b_dec_to_input": False,
                "normalize_activations": "none", "reshape_activations": "none",
                "meta": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
                         "sae_lens_version": "6.12.1"}}
    self._write(tensors, cfg_json)
    params, cfg, threshold = export.load_exported(self.dir)
    self.assertIsNone(threshold)
    self.assertEqual((cfg.allocation, cfg.k, cfg.select_on), ("topk", 3, "raw"))
    x = _x()
    out = model.forward(params, jnp.asarray(x), cfg)
    expected = _saelens_codes(tensors, cfg_json | {"activation_fn_kwargs": {"k": 3}}, x)
    np.testing.assert_allclose(out.codes, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.recon, expected @ tensors["W_dec"] + tensors["b_dec"],
                               rtol=1e-5, atol=1e-5)

  def test_encode_exported_matches_saelens(self):
    x = _x()
    np.testing.assert_allclose(export.encode_exported(self.dir, x),
                               _saelens_codes(self.tensors, self.cfg_json, x), atol=1e-6)
    # A JumpReLU folder SAELens wrote (no sae_jax record) loads as ReLU plus its threshold.
    rng = np.random.default_rng(8)
    tensors = {"W_enc": rng.normal(size=(D, F)).astype(np.float32),
               "b_enc": rng.normal(size=F).astype(np.float32),
               "W_dec": rng.normal(size=(F, D)).astype(np.float32),
               "b_dec": rng.normal(size=D).astype(np.float32),
               "threshold": rng.uniform(0.0, 1.0, F).astype(np.float32)}
    cfg_json = {"architecture": "jumprelu", "d_in": D, "d_sae": F, "dtype": "float32",
                "normalize_activations": "none",
                "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.3.hook_resid_post",
                             "context_size": 1024, "sae_lens_version": "6.12.1"}}
    self._write(tensors, cfg_json)
    codes = export.encode_exported(self.dir, x)
    np.testing.assert_allclose(codes, _saelens_codes(tensors, cfg_json | {
        "apply_b_dec_to_input": True}, x), rtol=1e-5, atol=1e-5)
    self.assertTrue(0 < np.count_nonzero(codes) < codes.size)
    info = export.exported_source(self.dir)
    self.assertEqual((info["source"], info["layer"], info["model_name"], info["context_size"]),
                     (None, None, "gemma-2-2b", 1024))

  def test_encode_exported_refuses_unrecorded_runtime_normalisation(self):
    self._write(cfg_json={k: v for k, v in self.cfg_json.items() if k != "sae_jax"}
                | {"normalize_activations": "expected_average_only_in"})
    with self.assertRaisesRegex(ValueError, "normalize_activations='expected_average_only_in'"
                                ".*normalization="):
      export.encode_exported(self.dir, _x())
