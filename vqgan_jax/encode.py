"""The codes dataset of a stage-2 run: `--mode=encode` writes it with the frozen stage-1
VQGAN (the LlamaGen pattern: encode once, train many steps), the transformer trainer reads it.

  stage-1 params (config.stage1_workdir) -> codes of data.train_split and data.eval_split
  -> a TFDS array_record dataset under <workdir>/codes (or config.data.codes_dir)

The dataset's metadata records the tokenizer that encoded it (`vqgan_load.tokenizer_identity`:
its run, step, EMA or not, a sha256 of its params); stage 2 (training, sampling, eval)
refuses a stage 1 with other params (`check_tokenizer`): its samples would be decoded by a
VQGAN that reads the codes differently.
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np
import tqdm

from vqgan_jax import parallel
from vqgan_jax.data import pipeline
from vqgan_jax.data import tokens
from vqgan_jax.models import gpt_load
from vqgan_jax.models import vqgan_load
from vqgan_jax.validate import ConfigError


def codes_dir(config, workdir):
  return config.data.codes_dir or os.path.join(workdir, 'codes')


def stage1_step(workdir):
  """The latest step of a stage-1 run, or None when it has no checkpoint."""
  return vqgan_load.latest_step(workdir)


# Metadata that says where the codes came from without deciding whether they are the same
# codes: the tokenizer's params fingerprint decides (a moved or copied run encodes the same).
_INFORMATIONAL = ('stage1_workdir', 'stage1_step', 'tokenizer')


def _metadata(config, layout, tokenizer):
  """What the codes depend on: equal metadata means the codes on disk are up to date."""
  return {
    'grid_h': layout.code_grid[0],
    'grid_w': layout.code_grid[1],
    'n_embed': layout.n_image,
    'cond_kind': layout.kind,
    'cond_grid': list(layout.cond_grid),
    'cond_n_embed': layout.cond_n_embed,
    'stage1_workdir': os.path.abspath(config.stage1_workdir),
    'stage1_step': stage1_step(config.stage1_workdir),
    'tokenizer': tokenizer,  # `vqgan_load.tokenizer_identity` of the params that encoded them
    'source': config.data.name,
    'image_size': config.data.image_size,
    'max_examples': config.encode.max_examples,
  }


def _describe(tokenizer):
  """'/a/stage1 step 600 (EMA params sha256 1a2b3c4d5e6f...)'."""
  ema = 'EMA ' if tokenizer.get('ema') else ''
  sha = str(tokenizer.get('params_sha256'))[:12]
  return f'{tokenizer.get("workdir")} step {tokenizer.get("step")} ({ema}params sha256 {sha}...)'


def _stale(old, new):
  """Why the codes on disk (metadata `old`) are not the ones `new` would write; '' if they
  are. Codes written before the tokenizer identity was recorded are judged by the stage-1
  path and step, as they were then."""
  changed = [k for k in new if k not in _INFORMATIONAL and old.get(k) != new[k]]
  if changed:
    return 'were encoded with ' + ', '.join(f'{k}={old.get(k)!r}, not {new[k]!r}' for k in changed)
  if old.get('tokenizer') is None:
    then = (old.get('stage1_workdir'), old.get('stage1_step'))
    now = (new['stage1_workdir'], new['stage1_step'])
    if then == now:
      return ''
    return (
      f'were encoded by {then[0]} step {then[1]}, not by '
      f'config.stage1_workdir={now[0]} step {now[1]}'
    )
  if old['tokenizer'].get('params_sha256') == new['tokenizer']['params_sha256']:
    return ''
  return (
    f'were encoded by {_describe(old["tokenizer"])}, not by '
    f'config.stage1_workdir={_describe(new["tokenizer"])}'
  )


def _kept_codes(config, workdir, name, path, meta):
  """{split: count} of the codes already on disk when they are up to date (their metadata is
  `meta`), else None; different codes without config.encode.overwrite are a DataError."""
  if not tokens.is_prepared(path):
    return None
  old = tokens.metadata(tokens.open_codes(codes_dir(config, workdir), name))
  why = _stale(old, meta)
  if why:
    if not config.encode.overwrite:
      raise tokens.DataError(
        f'The codes in {path} {why}: pass --config.encode.overwrite=True to encode them again.'
      )
    return None
  if old.get('tokenizer') is None:
    _warn_unchecked(path, old, config)
  logging.info('The codes in %s are up to date; not encoding again.', path)
  builder = tokens.open_codes(codes_dir(config, workdir), name)
  return {k: v.num_examples for k, v in builder.info.splits.items()}


def _encoded_examples(config, layout, frozen, params, shardings, mesh, counts):
  """`examples(split)`: the rows (codes, cond codes, label, index) of `split`'s real images,
  encoded batch by batch; `counts[split]` is set to the split's size."""
  spatial = layout.kind == 'spatial'
  batch_sh = parallel.batch_sharding(mesh)

  def encode_fn(p, batch):
    out = gpt_load.encode_batch(frozen, p, batch)
    return {k: out[k] for k in ('codes', 'cond_codes') if k in out}

  encode_jit = jax.jit(
    encode_fn, in_shardings=(shardings, batch_sh), out_shardings=parallel.replicated(mesh)
  )

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
      host = {k: parallel.gather(batch[k]) for k in ('label', 'index', 'mask')}
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

  return examples


def encode(config, workdir):
  """Writes the codes of data.train_split and data.eval_split; returns (path, counts, kept).

  Codes already on disk with the same metadata (same stage-1 params, data and grid) are kept
  and not encoded again; different ones are replaced only with config.encode.overwrite.
  """
  config, mesh, layout = gpt_load.setup(config)
  name = tokens.codes_name(config.data)
  path = tokens.dataset_path(codes_dir(config, workdir), name)
  # The params are restored first: whether the codes on disk are up to date depends on them.
  frozen, params, shardings = gpt_load.load_frozen(config, layout, mesh)
  meta = json.loads(json.dumps(_metadata(config, layout, frozen.stage1_id)))
  kept = _kept_codes(config, workdir, name, path, meta)
  if kept is not None:
    return path, kept, True
  counts = {}
  t0 = time.perf_counter()
  spatial = layout.kind == 'spatial'
  path = tokens.write_codes(
    codes_dir(config, workdir),
    name,
    splits=tokens.base_splits(config.data.train_split, config.data.eval_split),
    examples=_encoded_examples(config, layout, frozen, params, shardings, mesh, counts),
    seq_len=layout.code_grid[0] * layout.code_grid[1],
    n_embed=layout.n_image,
    cond_len=layout.cond_len if spatial else 0,
    cond_n_embed=layout.cond_n_embed,
    metadata=meta,
    overwrite=config.encode.overwrite,
  )
  logging.info('Encoded %s in %.1f s', counts, time.perf_counter() - t0)
  return path, counts, False


def open_codes(config, workdir, layout, tokenizer=None):
  """The codes dataset a stage-2 run trains on, checked against the config's grid and, given
  `tokenizer` (the stage-1 identity it will be decoded with), against the params that
  encoded it (`check_tokenizer`)."""
  builder = tokens.open_codes(codes_dir(config, workdir), tokens.codes_name(config.data))
  meta = tokens.metadata(builder)
  full = layout.code_grid  # stage 2 may train on crops of it (layout.crop)
  if (meta.get('grid_h'), meta.get('grid_w'), meta.get('n_embed')) != (
    full[0],
    full[1],
    layout.n_image,
  ):
    raise ConfigError(
      f'The codes dataset {builder.data_path} holds {meta.get("grid_h")}x'
      f"{meta.get('grid_w')} grids of {meta.get('n_embed')} codes, but this config's "
      f'stage 1 gives {full[0]}x{full[1]} of {layout.n_image}: encode again '
      '(--mode=encode --config.encode.overwrite=True)'
    )
  if tokenizer is not None:
    check_tokenizer(meta, builder.data_path, tokenizer, config)
  return builder


def _warn_unchecked(path, meta, config):
  logging.warning(
    'The codes in %s (encoded by %s step %s) record no tokenizer identity (an older version '
    'wrote them): it cannot be checked that config.stage1_workdir=%s holds the params that '
    'encoded them; re-encode with --mode=encode --config.encode.overwrite=True to record it.',
    path,
    meta.get('stage1_workdir'),
    meta.get('stage1_step'),
    config.stage1_workdir,
  )


def check_tokenizer(meta, path, tokenizer, config):
  """Raises ConfigError when the codes (metadata `meta`) were encoded by other stage-1 params
  than `tokenizer` (`vqgan_load.tokenizer_identity` of config.stage1_workdir): a transformer
  trained on them would be sampled through a decoder that reads its codes differently."""
  old = meta.get('tokenizer')
  if old is None:
    _warn_unchecked(path, meta, config)
  elif old.get('params_sha256') != tokenizer['params_sha256']:
    raise ConfigError(
      f'The codes in {path} were encoded by {_describe(old)}, but '
      f'config.stage1_workdir={_describe(tokenizer)} holds other params: re-encode with '
      '--mode=encode --config.encode.overwrite=True, or point config.stage1_workdir at the '
      'run that encoded them.'
    )


def check_codes_of_run(config, workdir, tokenizer):
  """`check_tokenizer` for a stage-2 run that trained on codes, when its codes dataset is
  still there (sampling and evaluation decode with `tokenizer`)."""
  if config.data.get('source', 'codes') != 'codes' or tokenizer is None:
    return
  directory, name = codes_dir(config, workdir), tokens.codes_name(config.data)
  path = tokens.dataset_path(directory, name)
  if tokens.is_prepared(path):
    check_tokenizer(tokens.metadata(tokens.open_codes(directory, name)), path, tokenizer, config)
