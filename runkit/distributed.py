"""Multi-process start-up under JAX's own runtime (several hosts, or processes on one).

Every process calls :func:`initialize` before touching devices; afterwards
``jax.devices()`` lists the devices of all processes, the trainer's mesh spans them, and
each process feeds only its own rows of every global batch (see
``ShuffledBatches(process_index=, process_count=)``).
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run; on CPU, collectives go through Gloo.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: total number of processes.
    process_id: this process, in ``[0, num_processes)``.
  """
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, num_processes={num_processes}); got "
                     f"{process_id}.")
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    # XLA:CPU has no collectives across processes unless an implementation is chosen.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)
