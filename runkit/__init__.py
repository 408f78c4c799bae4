"""runkit: the run plumbing shared by sae_jax and pruning_jax.

One implementation each of what a checkpointed training run needs around its step:

* ``runkit.checkpoint``: ``Checkpointer`` (numbered Orbax checkpoints of a state pytree and
  JSON metadata; keep-N, asynchronous saves, typed PRNG keys, optional digest, restore
  into a target tree with an expected-config check), ``tree_digest``, ``abstract_like``.
* ``runkit.configs``: ``config.json`` of a run folder (``read_config``, ``check_config``,
  ``write_config``), ``config_record`` of dataclass configs and ``config_differences``.
* ``runkit.metrics_log``: ``MetricsLog``, the JSON-lines metrics file cut back on resume.
* ``runkit.mesh``: ``make_mesh``, a named-axis device mesh.
* ``runkit.errors``: ``CheckpointError``, ``ConfigMismatchError``, ``NonFiniteError``.
"""

from runkit.checkpoint import CONFIGS_KEY
from runkit.checkpoint import Checkpointer
from runkit.checkpoint import DIGEST_KEY
from runkit.checkpoint import abstract_like
from runkit.checkpoint import tree_digest
from runkit.configs import ABSENT
from runkit.configs import CONFIG_FILE
from runkit.configs import ConfigDifference
from runkit.configs import check_config
from runkit.configs import config_differences
from runkit.configs import config_path
from runkit.configs import config_record
from runkit.configs import read_config
from runkit.configs import write_config
from runkit.errors import CheckpointError
from runkit.errors import ConfigMismatchError
from runkit.errors import NonFiniteError
from runkit.mesh import make_mesh
from runkit.metrics_log import MetricsLog

__all__ = [
    "ABSENT", "CONFIGS_KEY", "CONFIG_FILE", "CheckpointError", "Checkpointer",
    "ConfigDifference", "ConfigMismatchError", "DIGEST_KEY", "MetricsLog", "NonFiniteError",
    "abstract_like", "check_config", "config_differences", "config_path", "config_record",
    "make_mesh", "read_config", "tree_digest", "write_config",
]

__version__ = "0.1.0"
