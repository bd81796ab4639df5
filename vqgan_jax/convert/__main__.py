"""Command line: convert an original taming-transformers checkpoint.

  python -m vqgan_jax.convert taming --ckpt last.ckpt --config model.yaml --out DIR

VQModel: DIR is a stage-1 workdir (orbax checkpoint of the full training state, fresh
optimizer states) + DIR/config.json; fine-tune with `--config.init_from=DIR`.
Net2NetTransformer: DIR/first_stage (stage-1 workdir), DIR/cond_stage (when the condition is
its own VQModel), and DIR itself holding the GPT params ({'step', 'params'}) + DIR/config.json.
"""

import argparse
import json
import shutil
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m vqgan_jax.convert',
                                   description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='source', required=True)
  p = sub.add_parser('taming', help='a CompVis/taming-transformers Lightning checkpoint')
  p.add_argument('--ckpt', required=True, help='Lightning .ckpt (or a plain state dict)')
  p.add_argument('--config', required=True, help="the model's yaml (configs/model.yaml)")
  p.add_argument('--out', required=True, help='output directory (a workdir)')
  p.add_argument('--step', type=int, default=None,
                 help="checkpoint step (default: the ckpt's global_step)")
  p.add_argument('--overwrite', action='store_true', help='replace existing checkpoints in --out')
  args = parser.parse_args(argv)

  # Imported here so --help and argument errors are instant.
  from vqgan_jax.checkpoints import checkpoint_dir  # pylint: disable=g-import-not-at-top
  from vqgan_jax.convert import taming  # pylint: disable=g-import-not-at-top

  if args.overwrite:
    for d in (checkpoint_dir(args.out), checkpoint_dir(f'{args.out}/first_stage'),
              checkpoint_dir(f'{args.out}/cond_stage')):
      shutil.rmtree(d, ignore_errors=True)
  try:
    summary = taming.convert_taming_checkpoint(args.ckpt, args.config, args.out, step=args.step)
  except (taming.ConversionError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2, sort_keys=True))
  print(f'converted in {summary["seconds"]:.1f} s -> {summary["out"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
