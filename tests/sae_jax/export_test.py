"""Tests for sae_jax.export: the SAELens folder layout, round trips and the loader."""

import json
import pathlib
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from sae_jax import evaluate
from sae_jax import export
from sae_jax import model
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
      ("bad_normalization", {}, dict(normalization={"scale": 2.0}), "normalization must have"))
  def test_export_rejects(self, cfg_overrides, overrides, pattern):
    cfg = model.SAEConfig(**(dict(d_model=D, d_sae=F, allocation="topk", k=2) | cfg_overrides))
    kwargs = dict(layer=1, context_size=8) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      export.export_saelens(self.dir / "out", _params(), cfg, **kwargs)
    self.assertFalse((self.dir / "out" / "cfg.json").exists())


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
