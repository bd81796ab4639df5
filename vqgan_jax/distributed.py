"""Several processes (hosts): when and how `main` starts `jax.distributed`.

Imports no JAX at module level: `initialize` must run before anything touches a backend.

  mode 'auto'  initialise when a coordinator address, process count or id is given, or
               $JAX_COORDINATOR_ADDRESS is set, or a multi-process Slurm step (srun,
               SLURM_NTASKS > 1) or Open MPI job (mpirun, OMPI_COMM_WORLD_SIZE > 1) is
               detected; JAX's cluster detection fills in what is not given.
  mode 'on'    always (e.g. Cloud TPU pod slices, where JAX reads the TPU metadata).
  mode 'off'   never.
"""

import os


def cluster_detected():
  """The launcher of a multi-process job that JAX can read its parameters from, or None."""
  env = os.environ
  if 'SLURM_JOB_ID' in env and 'SLURM_STEP_NODELIST' in env and 'SLURM_PROCID' in env:
    if int(env.get('SLURM_NTASKS', '1') or 1) > 1:
      return 'Slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'Open MPI'
  return None


def initialize(mode, coordinator_address=None, num_processes=None, process_id=None):
  """Starts JAX's distributed runtime if `mode` ('auto', 'on', 'off') asks for it.

  Must run before any other JAX call (backends must not exist yet). Returns a one-line
  description of what it did, or None when it did nothing.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if mode == 'off':
    if any(v is not None for v in explicit):
      raise ValueError(
        '--distributed=off contradicts --coordinator_address/--num_processes/--process_id'
      )
    return None
  why = None
  if mode == 'on':
    why = '--distributed=on'
  elif any(v is not None for v in explicit):
    why = 'flags'
  elif os.environ.get('JAX_COORDINATOR_ADDRESS'):
    why = '$JAX_COORDINATOR_ADDRESS'
  else:
    cluster = cluster_detected()
    why = f'{cluster} job detected' if cluster else None
  if why is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return (
    f'jax.distributed: process {jax.process_index()} of {jax.process_count()} '
    f'({why}), {jax.local_device_count()} local / {jax.device_count()} devices'
  )
