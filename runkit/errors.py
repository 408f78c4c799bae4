"""The errors a checkpointed run raises, shared by every package that uses runkit."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: missing, unreadable, damaged or of another shape."""


class ConfigMismatchError(CheckpointError, ValueError):
  """A checkpoint or run folder written with configs other than the ones given.

  A ``CheckpointError`` for callers handling unusable checkpoints and a ``ValueError`` for
  callers checking their arguments.
  """


class NonFiniteError(FloatingPointError):
  """Training met a NaN or infinity (in a batch or a loss).

  Packages raise their own subclasses (``sae_jax.training.loop.NonFiniteError``,
  ``pruning_jax.rounds.NonFiniteLossError``); catching this class catches both.
  """
