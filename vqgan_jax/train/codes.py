"""The codes dataset of a stage-2 run: `--mode=encode` writes it with the frozen stage-1
VQGAN (the LlamaGen pattern: encode once, train many steps), the transformer trainer reads it.

  stage-1 params (config.stage1_workdir) -> codes of data.train_split and data.eval_split
  -> a TFDS array_record dataset under <workdir>/codes (or config.data.codes_dir)
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np
import tqdm

from vqgan_jax import checkpoints
from vqgan_jax import parallel
from vqgan_jax.data import pipeline
from vqgan_jax.data import tokens
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config
from vqgan_jax.train.common import gather
from vqgan_jax.validate import ConfigError


def codes_dir(config, workdir):
  return config.data.codes_dir or os.path.join(workdir, 'codes')


def stage1_step(workdir):
  """The latest step of a stage-1 run, or None when it has no checkpoint."""
  if not workdir or not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return None
  with checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None) as ckpt:
    return ckpt.latest_step()


def _metadata(config, layout):
  """What the codes depend on: equal metadata means the codes on disk are up to date."""
  return {
    'grid_h': layout.grid[0],
    'grid_w': layout.grid[1],
    'n_embed': layout.n_image,
    'cond_kind': layout.kind,
    'cond_grid': list(layout.cond_grid),
    'cond_n_embed': layout.cond_n_embed,
    'stage1_workdir': os.path.abspath(config.stage1_workdir),
    'stage1_step': stage1_step(config.stage1_workdir),
    'source': config.data.name,
    'image_size': config.data.image_size,
    'max_examples': config.encode.max_examples,
  }


def encode(config, workdir):
  """Writes the codes of data.train_split and data.eval_split; returns (path, counts, kept).

  Codes already on disk with the same metadata (same stage-1 run and step, data and grid)
  are kept and not encoded again; different ones are replaced only with
  config.encode.overwrite.
  """
  config, mesh, layout = stage2_config.setup(config)
  name = tokens.codes_name(config.data)
  meta = _metadata(config, layout)
  path = tokens.dataset_path(codes_dir(config, workdir), name)
  if tokens.is_prepared(path):
    builder = tokens.open_codes(codes_dir(config, workdir), name)
    if tokens.metadata(builder) == json.loads(json.dumps(meta)):
      logging.info('The codes in %s are up to date; not encoding again.', path)
      return path, {k: v.num_examples for k, v in builder.info.splits.items()}, True
  frozen, params, shardings = stage2.load_frozen(config, layout, mesh)
  spatial = layout.kind == 'spatial'
  batch_sh = parallel.batch_sharding(mesh)

  def encode_fn(p, batch):
    out = stage2.encode_batch(frozen, p, batch)
    return {k: out[k] for k in ('codes', 'cond_codes') if k in out}

  encode_jit = jax.jit(
    encode_fn, in_shardings=(shardings, batch_sh), out_shardings=parallel.replicated(mesh)
  )
  splits = tokens.base_splits(config.data.train_split, config.data.eval_split)
  counts = {}

  def examples(split):
    it, n = tokens.ordered_batches(
      config.data,
      split,
      config.encode.batch_size,
      cond=config.cond if spatial else None,
      max_examples=config.encode.max_examples,
    )
    counts[split] = n
    bar = tqdm.tqdm(
      total=n, disable=jax.process_index() != 0, dynamic_ncols=True, desc=f'encode {split}'
    )

    def finish(out, batch):
      rows = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
      # Host-side bookkeeping of the whole global batch, in the same (process) order.
      host = {k: gather(batch[k]) for k in ('label', 'index', 'mask')}
      keep = host['mask']
      rows = {k: v[keep] for k, v in rows.items()}
      rows.update(label=host['label'][keep], index=host['index'][keep])
      bar.update(int(keep.sum()))
      return rows

    # One batch in flight: the next batch is loaded and dispatched before the previous one's
    # codes are fetched, so loading and writing overlap the encoder.
    pending = None
    for batch in it:
      inputs = {'image': batch['image']}
      if spatial:
        inputs['cond_map'] = batch['cond_map']
      out = encode_jit(params, pipeline.to_global(inputs, batch_sh))
      if pending is not None:
        yield finish(*pending)
      pending = (out, batch)
    if pending is not None:
      yield finish(*pending)
    bar.close()

  t0 = time.perf_counter()
  path = tokens.write_codes(
    codes_dir(config, workdir),
    name,
    splits=splits,
    examples=examples,
    seq_len=layout.image_len,
    n_embed=layout.n_image,
    cond_len=layout.cond_len if spatial else 0,
    cond_n_embed=layout.cond_n_embed,
    metadata=meta,
    overwrite=config.encode.overwrite,
  )
  logging.info('Encoded %s in %.1f s', counts, time.perf_counter() - t0)
  return path, counts, False


def open_codes(config, workdir, layout):
  """The codes dataset a stage-2 run trains on, checked against the config's grid."""
  builder = tokens.open_codes(codes_dir(config, workdir), tokens.codes_name(config.data))
  meta = tokens.metadata(builder)
  if (meta.get('grid_h'), meta.get('grid_w'), meta.get('n_embed')) != (
    layout.grid[0],
    layout.grid[1],
    layout.n_image,
  ):
    raise ConfigError(
      f'The codes dataset {builder.data_path} holds {meta.get("grid_h")}x'
      f"{meta.get('grid_w')} grids of {meta.get('n_embed')} codes, but this config's "
      f'stage 1 gives {layout.grid[0]}x{layout.grid[1]} of {layout.n_image}: encode again '
      '(--mode=encode --config.encode.overwrite=True)'
    )
  step = stage1_step(config.stage1_workdir)
  if step is not None and meta.get('stage1_step') not in (None, step):
    logging.warning(
      'The codes in %s were encoded at stage-1 step %s; %s is now at step %s.',
      builder.data_path,
      meta.get('stage1_step'),
      config.stage1_workdir,
      step,
    )
  return builder
