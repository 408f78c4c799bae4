"""Activation sources of the SAE comparison (`experiments.sae_allocation`).

Each source is training batches plus a held-out set and what that set can be scored
against: MiniLM's residual stream (a harvested store, held-out documents, splicing into
the LM, corpus labels for k-sparse probing), a causal LM's (GPT-2 / Pythia from
``--model-dir``: harvested store, held-out documents, CE loss recovered with the SAE
spliced in) or the synthetic benchmark (known features).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

from sae_jax.data import batches as batches_lib
from sae_jax.data import corpus
from sae_jax import lm
from sae_jax.data import harvest
from sae_jax.data import lm_harvest
from sae_jax.data import lm_stream
from sae_jax.data import minilm
from sae_jax.data import store as store_lib
from sae_jax.data import synthbench
from sae_jax.evaluation import evaluate
from sae_jax.evaluation import lm_fidelity
from sae_jax.evaluation import probing

if TYPE_CHECKING:  # the preset type only; sae_allocation imports this module
  from experiments.sae_allocation import Preset

PAPER_D_SAE = 32768
# The generative model of the synthetic source is fixed (every SAE seed faces the same
# true features); the stored token stream has its own seed.
SYNTH_MODEL_SEED = 0
SYNTH_STREAM_SEED = 0
# Tokens of the b_dec initialisation sample.
INIT_SAMPLE = 4096
# k of k-sparse probing (SAEBench uses 1, 2 and 5).
PROBE_KS = (1, 2, 5, 20)


BUILTIN_CORPORA = ("bible-kjv", "fortunes", "python-doc")


def corpus_specs(text_paths) -> list:
  """One spec per source: the user's paths, else the installed Debian corpora."""
  if text_paths:
    return [corpus.CorpusSpec(sources=(p,)) for p in text_paths]
  specs = []
  for name in BUILTIN_CORPORA:
    try:
      next(corpus.iter_documents(corpus.CorpusSpec(sources=(name,))))
      specs.append(corpus.CorpusSpec(sources=(name,)))
    except (FileNotFoundError, StopIteration):
      pass
  # With none installed, "default" falls back to the standard library with a notice.
  return specs or [corpus.CorpusSpec(sources=("default",))]


def balanced_documents(specs, held_out: bool, every: int = 25, with_source: bool = False):
  """Documents of every source, the one with the fewest characters emitted next.

  Every ``every``-th document is held out for evaluation (``held_out=True`` yields only
  those); the stream is deterministic, so a resumed harvest sees the same windows. With
  ``with_source`` each item is ``(index of its spec, text)``.
  """
  iters = [corpus.iter_documents(spec) for spec in specs]
  chars = [0] * len(iters)
  alive = list(range(len(iters)))
  i = 0
  while alive:
    j = min(alive, key=lambda a: (chars[a], a))
    doc = next(iters[j], None)
    if doc is None:
      alive.remove(j)
      continue
    chars[j] += len(doc[1])
    if (i % every == 0) == held_out:
      yield (j, doc[1]) if with_source else doc[1]
    i += 1


def windows(tokenizer, texts, window: int, docs_per_chunk: int = 16):
  """``(ids, mask)`` chunks of fixed-length windows from a document stream."""
  while True:
    chunk = list(itertools.islice(texts, docs_per_chunk))
    if not chunk:
      return
    ids, mask = minilm.text_windows(tokenizer, chunk, window)
    if len(ids):
      yield ids, mask


def harvest_store(args, preset: Preset, bert_params, bert_cfg, tokenizer, specs):
  """The cached activation store of the preset (harvested on first use, resumable)."""
  if args.store:
    return store_lib.StoreReader(args.store)
  name = f"minilm_l{preset.layer}_w{preset.window}_{preset.harvest_tokens}"
  path = pathlib.Path(args.cache) / name
  layer = preset.layer

  @jax.jit
  def activations(ids, mask):
    return minilm.bert_forward(bert_params, bert_cfg, ids, mask,
                               output_layer=layer).hidden_states[layer]

  return harvest.harvest(
      activations, windows(tokenizer, balanced_documents(specs, held_out=False), preset.window),
      path, model_name="sentence-transformers/all-MiniLM-L6-v2", layer=layer,
      hook=f"blocks.{layer}.hook_resid_post", max_tokens=preset.harvest_tokens, batch_size=32,
      keep_fn=harvest.exclude_tokens([101, 102]), progress=not args.quiet,
      meta={"corpora": [list(s.sources) for s in specs], "window": preset.window})


def eval_set(preset: Preset, bert_params, bert_cfg, tokenizer, specs):
  """Held-out windows and their real-token activations (never seen in training)."""
  ids, mask = [], []
  for i, m in windows(tokenizer, balanced_documents(specs, held_out=True), preset.window):
    ids.append(i)
    mask.append(m)
    if sum(len(x) for x in ids) >= preset.eval_windows:
      break
  ids = np.concatenate(ids)[:preset.eval_windows]
  mask = np.concatenate(mask)[:preset.eval_windows]
  hidden = minilm.bert_forward(bert_params, bert_cfg, ids, mask,
                               output_layer=preset.layer).hidden_states[preset.layer]
  keep = harvest.exclude_tokens([101, 102])(ids, mask)
  return ids, mask, np.asarray(hidden)[keep]


def probe_set(preset: Preset, bert_params, bert_cfg, tokenizer, specs
              ) -> tuple[np.ndarray, np.ndarray]:
  """Held-out real-token activations labelled by the corpus they come from.

  Up to ``probe_windows`` windows per corpus, each packed from that corpus's held-out
  documents only (the same held-out rule as :func:`eval_set`, so never trained on).
  Returns ``(activations [n, d], labels [n])``; corpora without held-out text are left out.
  """
  texts: list[list[str]] = [[] for _ in specs]
  budget = preset.probe_windows * preset.window * 8  # characters: ~4 per word piece, x2
  used = [0] * len(specs)
  for j, text in balanced_documents(specs, held_out=True, with_source=True):
    if used[j] < budget:
      texts[j].append(text)
      used[j] += len(text)
    if min(used) >= budget:
      break
  xs, labels = [], []
  for j, docs in enumerate(texts):
    if not docs:
      continue
    ids, mask = minilm.text_windows(tokenizer, docs, preset.window)
    ids, mask = ids[:preset.probe_windows], mask[:preset.probe_windows]
    hidden = np.concatenate([
        np.asarray(minilm.bert_forward(bert_params, bert_cfg, ids[i:i + 32], mask[i:i + 32],
                                       output_layer=preset.layer).hidden_states[preset.layer])
        for i in range(0, len(ids), 32)])
    kept = hidden[harvest.exclude_tokens([101, 102])(ids, mask)]
    xs.append(kept)
    labels.append(np.full(len(kept), j, np.int64))
  return np.concatenate(xs), np.concatenate(labels)


@dataclasses.dataclass
class Source:
  """One activation source of the comparison and what it can be evaluated against.

  Attributes:
    name: ``"minilm"`` or ``"synthbench"``.
    d: activation width.
    make_batches: ``(batch_size, seed) -> iterator`` of unscaled training batches with
      the trainer's ``state``/``restore`` protocol.
    init_sample: unscaled activations for the ``b_dec`` initialisation.
    store, store_tokens: the training store and its size (None when sampled per batch).
    scale: input normalisation (mean squared norm ``d`` after scaling).
    eval_x: held-out activations (unscaled), never trained on.
    d_sae: dictionary width of every SAE on this source.
    layer, context_size: where the activations come from (None for synthetic data).
    fidelity: ``(state, cfg, theta) -> dict`` splicing into the LM, or None.
    features, eval_codes: true feature vectors and the true codes of ``eval_x`` (None
      for real activations).
    probe_x, probe_labels: held-out activations (unscaled) and labels for k-sparse
      probing (which corpus a token came from), or None.
    probe_raw: k-sparse probing accuracy of the raw activations, by k.
    description: one line for the report.
    export_names: SAELens names of the exported SAEs (``model_name``, ``hook_name``,
      ``prepend_bos``) where they are not MiniLM's defaults.
  """

  name: str
  d: int
  make_batches: Callable
  init_sample: np.ndarray
  store: str | None
  store_tokens: int | None
  scale: float
  eval_x: np.ndarray
  d_sae: int
  layer: int | None = None
  context_size: int | None = None
  fidelity: Callable | None = None
  features: np.ndarray | None = None
  eval_codes: np.ndarray | None = None
  probe_x: np.ndarray | None = None
  probe_labels: np.ndarray | None = None
  probe_raw: dict | None = None
  description: str = ""
  export_names: dict | None = None


def minilm_source(args, preset: Preset) -> Source:
  """MiniLM's residual stream: harvested store, held-out windows, LM splicing."""
  bert_params, bert_cfg = minilm.load_minilm()
  tokenizer = minilm.load_tokenizer()
  specs = corpus_specs(args.text)
  reader = harvest_store(args, preset, bert_params, bert_cfg, tokenizer, specs)
  d_model = reader.d
  d_sae = PAPER_D_SAE if preset.expansion == 0 else int(preset.expansion * d_model)
  scale = float(np.sqrt(d_model) / reader.stats.norm_mean)
  eval_ids, eval_mask, eval_x = eval_set(preset, bert_params, bert_cfg, tokenizer, specs)

  def fidelity(state, cfg, theta):
    return evaluate.fidelity(state.params, cfg, bert_params, bert_cfg, eval_ids, eval_mask,
                             preset.layer, normalization={"mean": 0.0, "scale": 1.0 / scale},
                             threshold=theta, mean_activation=reader.stats.mean)

  corpora = ", ".join("+".join(s.sources) for s in specs)
  probe_x = probe_labels = probe_raw = None
  if len(specs) > 1 and preset.probe_windows > 0:
    probe_x, probe_labels = probe_set(preset, bert_params, bert_cfg, tokenizer, specs)
    if len(np.unique(probe_labels)) > 1:
      probe_raw = probe_accuracy(probe_x * np.float32(scale), probe_labels)
    else:
      probe_x = probe_labels = None
  return Source("minilm", *_store_fields(reader, preset.mix_shards), scale, eval_x, d_sae,
                layer=preset.layer, context_size=preset.window, fidelity=fidelity, probe_x=probe_x,
                probe_labels=probe_labels, probe_raw=probe_raw,
                description=(f"all-MiniLM-L6-v2 residual stream after block {preset.layer} "
                             f"({corpora}), {reader.count} harvested tokens, d={d_model}"))


def _store_fields(reader, mix_shards: bool = False) -> tuple:
  """(d, make_batches, init_sample, store, store_tokens) of a store source."""
  return (reader.d,
          lambda batch_size, seed: batches_lib.ShuffledBatches(reader, batch_size, seed,
                                                               mix_shards=mix_shards),
          reader.read(0, min(reader.count, INIT_SAMPLE)), str(reader.path), reader.count)


def synthbench_source(args, preset: Preset) -> Source:
  """SynthSAEBench-style activations with known features.

  With ``synth_tokens > 0`` the tokens are drawn once into a store that every run reads
  (what a CPU affords: drawing costs more than a small SAE step); with 0 every batch is
  drawn fresh on the device (seed ``s`` of the comparison draws stream ``1 + s``).
  Evaluation tokens come from a stream no training batch uses.
  """
  bench_cfg = synthbench.synthbench_preset(preset.synthbench)
  bench = synthbench.make_synthbench(jax.random.key(SYNTH_MODEL_SEED), bench_cfg)
  held_out = synthbench.SynthBenchBatches(bench, 1, SYNTH_STREAM_SEED)
  eval_x, eval_codes = held_out.sample_with_codes(preset.synth_eval_tokens)
  if preset.synth_tokens > 0:
    name = f"synthbench_{preset.synthbench}_m{SYNTH_MODEL_SEED}_{preset.synth_tokens}"
    reader = synthbench.write_synthbench_store(
        pathlib.Path(args.cache) / name, bench, preset.synth_tokens, seed=SYNTH_STREAM_SEED,
        source=f"synthbench:{preset.synthbench}", progress=not args.quiet)
    fields = _store_fields(reader, preset.mix_shards)
    norm_mean = reader.stats.norm_mean
    tokens = f"{reader.count} stored tokens"
  else:
    init = held_out.sample(INIT_SAMPLE, offset=2**30 + 1)
    fields = (bench_cfg.d_model,
              lambda batch_size, seed: synthbench.SynthBenchBatches(bench, batch_size, 1 + seed),
              init, None, None)
    norm_mean = float(np.linalg.norm(init, axis=1).mean())
    tokens = "fresh tokens every batch"
  d_sae = max(1, int(round(preset.synth_width * bench_cfg.num_features)))
  scale = float(np.sqrt(fields[0]) / norm_mean)
  return Source("synthbench", *fields, scale, eval_x, d_sae,
                features=np.asarray(bench.features), eval_codes=eval_codes,
                description=(f"synthbench '{preset.synthbench}': d={bench_cfg.d_model}, "
                             f"{bench_cfg.num_features} true features, true L0 "
                             f"{synthbench.true_l0(bench):.2f} ({synthbench.true_l0(bench, top=d_sae):.2f} "
                             f"in the {d_sae} most frequent), mean max |cos| "
                             f"{float(bench.mean_max_cos):.3f}; {tokens}"))


# Positions dropped at the start of every causal-LM context (the attention sink).
LM_SKIP_FIRST = 1


def lm_windows(tokenizer, texts, context: int, separator: int | None):
  """``(ids, mask)`` chunks of full ``context``-token windows packed from documents.

  Each document's tokens, then ``separator`` (the end-of-text id) when there is one,
  form one stream cut into windows without padding (as GPT-2 and Pythia were trained).
  """
  def tokens():
    for text in texts:
      ids = tokenizer.encode(text).ids
      if ids:
        yield np.asarray(ids + ([] if separator is None else [separator]), np.int32)

  for ids in lm_harvest.pack_tokens(tokens(), context):
    yield ids, np.ones_like(ids)


def lm_source(args, preset: Preset) -> Source:
  """A causal LM's activations at ``--hook`` (GPT-2 / GPT-NeoX from ``--model-dir``).

  Harvests the preset's corpora into a cached store (or reads ``--store``, or with
  ``--stream`` / ``Preset.lm_stream`` trains straight from the model on the corpora's
  token windows, `sae_jax.data.lm_stream`), evaluates on held-out documents, and splices
  reconstructions back into the model: the ``fidelity``
  columns are the next-token CE loss recovered against zero ablation, with the mean
  ablation, KL and the raw CE values beside them (`sae_jax.evaluation.lm_fidelity`).
  """
  if not args.model_dir:
    raise ValueError("the lm source needs --model-dir (a local Hugging Face GPT-2 or "
                     "GPT-NeoX folder with config.json, safetensors weights, tokenizer.json).")
  lm_cfg, lm_params = lm.load_model(args.model_dir)
  tokenizer = lm.load_tokenizer(args.model_dir)
  hook = args.hook or f"blocks.{preset.layer}.hook_resid_pre"
  layer = lm_harvest.hook_layer(lm_cfg, hook)
  separator = lm_harvest.eos_id(tokenizer)
  specs = corpus_specs(args.text)
  acts = lm_harvest.activation_fn(lm_params, lm_cfg, hook)
  model_name = pathlib.Path(args.model_dir).resolve().name
  if args.stream and args.store:
    raise ValueError("--store and --stream exclude each other: a stream computes the "
                     "activations while training; drop one.")
  stream = args.stream or (preset.lm_stream and not args.store)  # a given store wins
  if stream:
    reader = None
    windows = []
    need = -(-preset.harvest_tokens // (preset.window - LM_SKIP_FIRST))
    for ids, _ in lm_windows(tokenizer, balanced_documents(specs, held_out=False),
                             preset.window, separator):
      windows.append(ids)
      if sum(len(w) for w in windows) >= need:
        break
    if not windows:
      raise ValueError(f"the corpora give no full {preset.window}-token window to stream.")
    train_ids = np.concatenate(windows)[:need]
    stream_fn = lambda ids: acts(ids, None)
    init_sample = np.concatenate([
        np.asarray(stream_fn(train_ids[i:i + 8]))[:, LM_SKIP_FIRST:].reshape(
            -1, lm_cfg.hidden_size)
        for i in range(0, min(len(train_ids), -(-INIT_SAMPLE // (preset.window - 1))), 8)
    ])[:INIT_SAMPLE]
    d = lm_cfg.hidden_size
    fields = (d, lambda batch_size, seed: lm_stream.StreamedBatches(
        stream_fn, train_ids, batch_size, seed, sub_batch=8, skip_first=LM_SKIP_FIRST),
              init_sample, None, None)
    norm_mean = float(np.linalg.norm(init_sample, axis=1).mean())
    mean_activation = init_sample.mean(axis=0)
    trained_on = (f"{len(train_ids)} contexts streamed through the model "
                  f"({len(train_ids) * (preset.window - LM_SKIP_FIRST)} tokens per epoch)")
  elif args.store:
    reader = store_lib.StoreReader(args.store)
  else:
    name = f"lm_{model_name}_{hook}_w{preset.window}_{preset.harvest_tokens}"
    reader = harvest.harvest(
        acts, lm_windows(tokenizer, balanced_documents(specs, held_out=False), preset.window,
                         separator),
        pathlib.Path(args.cache) / name, model_name=model_name, layer=layer, hook=hook,
        max_tokens=preset.harvest_tokens, batch_size=8,
        keep_fn=lm_harvest.skip_first_keep(LM_SKIP_FIRST), progress=not args.quiet,
        meta={"corpora": [list(s.sources) for s in specs], "window": preset.window,
              "skip_first": LM_SKIP_FIRST})
  if reader is not None:
    if reader.d != lm_cfg.hidden_size:
      raise ValueError(f"the store {reader.path} holds d={reader.d} activations but "
                       f"{args.model_dir} has d={lm_cfg.hidden_size}: pass the store "
                       f"harvested from this model or drop --store.")
    fields = _store_fields(reader, preset.mix_shards)
    norm_mean, mean_activation = reader.stats.norm_mean, reader.stats.mean
    trained_on = f"{reader.count} harvested tokens"
  d = lm_cfg.hidden_size
  eval_ids = []
  for ids, _ in lm_windows(tokenizer, balanced_documents(specs, held_out=True), preset.window,
                           separator):
    eval_ids.append(ids)
    if sum(len(x) for x in eval_ids) >= preset.eval_windows:
      break
  if not eval_ids:
    raise ValueError(f"the held-out documents give no full {preset.window}-token window; "
                     f"pass more text (--text) or a shorter window.")
  eval_ids = np.concatenate(eval_ids)[:preset.eval_windows]
  eval_x = np.concatenate([
      np.asarray(acts(eval_ids[i:i + 8], None))[:, LM_SKIP_FIRST:].reshape(-1, d)
      for i in range(0, len(eval_ids), 8)])
  d_sae = PAPER_D_SAE if preset.expansion == 0 else int(preset.expansion * d)
  scale = float(np.sqrt(d) / norm_mean)

  def fidelity(state, cfg, theta):
    out = lm_fidelity.lm_fidelity(
        state.params, cfg, lm_params, lm_cfg, eval_ids, hook, threshold=theta,
        normalization={"mean": 0.0, "scale": 1.0 / scale}, skip_first=LM_SKIP_FIRST,
        mean_activation=mean_activation)
    # The report's fidelity column: CE loss recovered against zero ablation.
    return {**out, "fidelity_recovered": out["ce_recovered_zero"]}

  corpora = ", ".join("+".join(s.sources) for s in specs)
  return Source("lm", *fields, scale, eval_x, d_sae, layer=layer,
                context_size=preset.window, fidelity=fidelity,
                description=(f"{model_name} {hook} ({corpora}), {trained_on}, d={d}; "
                             f"fidelity = next-token CE loss recovered against zero "
                             f"ablation"),
                export_names={"model_name": model_name, "hook_name": hook,
                              "prepend_bos": False})


SOURCES = {"minilm": minilm_source, "lm": lm_source, "synthbench": synthbench_source}


def probe_accuracy(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
  """k-sparse probing accuracy (one-vs-rest over corpora, averaged) at ``PROBE_KS``."""
  ks = tuple(k for k in PROBE_KS if k <= features.shape[1])
  return {k: float(v) for k, v in probing.k_sparse_probe(features, labels, ks=ks).items()}
