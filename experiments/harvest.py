"""Harvest a causal language model's activations at one hook into an activation store.

Run:
  python -m experiments.harvest --model-dir DIR --hook HOOK --out STORE --text FILE [FILE ...]
  python -m experiments.harvest --model-dir DIR --hook HOOK --out STORE --token-ids IDS.npy

``DIR`` is a local Hugging Face folder of a GPT-2 or GPT-NeoX / Pythia model
(``config.json``, safetensors weights, ``tokenizer.json``); ``HOOK`` a TransformerLens
name such as ``blocks.3.hook_resid_post``. With ``--text`` each file is one document,
tokenized with the folder's ``tokenizer.json``; documents are joined with the
tokenizer's ``<|endoftext|>`` id between them and packed into contexts of ``--context``
tokens (the incomplete last context is dropped). With ``--token-ids`` the rows of an
``np.save``-d int array ``[sequences, context]`` are the contexts. Rows are stored
sequence-major, then by position, without the first ``--skip-first`` positions of every
context. An interrupted harvest resumes when the same command is run again and ends
byte-identical to an uninterrupted one; a store written with other settings (model,
hook, context, skip-first, dtype, source) is refused. See ``sae_jax.data.lm_harvest``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import runkit
from sae_jax.data import lm_harvest
from sae_jax.data import store as store_lib

PROG = "python -m experiments.harvest"


class _Parser(argparse.ArgumentParser):
  """Prints a usage error as one line."""

  def error(self, message):
    self.exit(2, f"harvest: error: {message} (see {PROG} --help)\n")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--model-dir", required=True, help="local Hugging Face model folder")
  parser.add_argument("--hook", required=True, help="hook name, e.g. blocks.3.hook_resid_post")
  parser.add_argument("--out", required=True, help="activation store folder (resumed if present)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", nargs="+", metavar="FILE", help="text files, one document each")
  source.add_argument("--token-ids", metavar="FILE.npy",
                      help="int array [sequences, context] saved with np.save")
  parser.add_argument("--context", type=int, default=None,
                      help=f"tokens per context (default {lm_harvest.DEFAULT_CONTEXT} for "
                           "--text; the array's second dimension for --token-ids)")
  parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
  parser.add_argument("--max-tokens", type=int, default=None,
                      help="stop once the store holds this many rows (default: all)")
  parser.add_argument("--skip-first", type=int, default=1,
                      help="leading positions of every context not stored (default 1)")
  parser.add_argument("--dtype", choices=sorted(lm_harvest.MODEL_DTYPES), default="float32",
                      help="model parameter and activation dtype")
  parser.add_argument("--store-dtype", choices=list(store_lib.DTYPES), default="float32",
                      help="storage dtype of the rows")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices to split each batch over ('data' axis; default 1, the "
                           "default device; 0 = every device JAX sees)")
  parser.add_argument("--model-parallel", type=int, default=1,
                      help="devices to split heads and MLP width over ('model' axis, for "
                           "models too large for one device; default 1)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  return parser


def main(argv: list[str] | None = None) -> store_lib.StoreReader:
  """Runs the command line; bad input prints one line to stderr and exits with status 2."""
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    mesh = None
    if args.devices != 1 or args.model_parallel != 1:
      if args.devices < 0:
        raise ValueError(f"--devices must be >= 0 (0 = every device); got {args.devices}.")
      mesh = runkit.make_mesh({"data": args.devices or None, "model": args.model_parallel},
                              labels={"data": "--devices", "model": "--model-parallel"})
    reader = lm_harvest.harvest_lm(
        args.model_dir, args.hook, args.out, text=args.text, token_ids=args.token_ids,
        context=args.context, skip_first=args.skip_first, batch_size=args.batch_size,
        max_tokens=args.max_tokens, model_dtype=args.dtype, store_dtype=args.store_dtype,
        progress=not args.quiet, mesh=mesh)
  except (ValueError, FileNotFoundError, ImportError, OSError) as err:
    parser.exit(2, f"harvest: error: {' '.join(str(err).split())}\n")
  except KeyboardInterrupt:
    parser.exit(130, f"harvest: interrupted; run the same command again to resume "
                     f"{args.out}.\n")
  if not args.quiet:
    print(f"{args.out}: {reader.count} rows of d={reader.d} ({reader.dtype}) from "
          f"{reader.manifest['model']} {reader.manifest['hook']}")
  return reader


if __name__ == "__main__":
  main()
