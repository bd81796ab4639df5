"""Command line: convert an original taming-transformers checkpoint (or FID Inception weights).

  python -m vqgan_jax.convert taming --ckpt last.ckpt --config model.yaml --out DIR
  python -m vqgan_jax.convert inception --pth pt_inception-2015-12-05-6726825d.pth --out FILE.npz

VQModel: DIR is a stage-1 workdir (orbax checkpoint of the full training state, fresh
optimizer states) + DIR/config.json; fine-tune with `--config.init_from=DIR`.
Net2NetTransformer: DIR/first_stage (stage-1 workdir), DIR/cond_stage (when the condition is
its own VQModel), and DIR itself holding the GPT params ({'step', 'params'}) + DIR/config.json.
Everything is read and checked before anything is written, and DIR is replaced in one rename
at the end, so a failed conversion leaves an existing DIR as it was.

inception: pytorch-fid's FID Inception state dict -> a `.npz` that `--mode=eval` loads without
torch (`--config.eval.inception_weights=FILE.npz`); written to a temp file, then renamed.
"""

import argparse
import json
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog='python -m vqgan_jax.convert', description=__doc__.split('\n\n')[0]
  )
  sub = parser.add_subparsers(dest='source', required=True)
  p = sub.add_parser('taming', help='a CompVis/taming-transformers Lightning checkpoint')
  p.add_argument('--ckpt', required=True, help='Lightning .ckpt (or a plain state dict)')
  p.add_argument('--config', required=True, help="the model's yaml (configs/model.yaml)")
  p.add_argument('--out', required=True, help='output directory (a workdir)')
  p.add_argument(
    '--step', type=int, default=None, help="checkpoint step (default: the ckpt's global_step)"
  )
  p.add_argument(
    '--overwrite',
    action='store_true',
    help='replace the checkpoints and config of an earlier conversion or run in '
    '--out (other files there are kept)',
  )
  p.add_argument(
    '--trust_pickle',
    action='store_true',
    help='UNSAFE: load a --ckpt that names Python objects beyond tensors and the '
    "original release's few, with the full unpickler, which can run any code "
    'the file contains; only for a file from a source you trust',
  )
  p = sub.add_parser('inception', help="pytorch-fid's FID Inception weights (.pth) -> .npz")
  p.add_argument('--pth', required=True, help='pt_inception-2015-12-05-6726825d.pth')
  p.add_argument('--out', required=True, help='output .npz (replaced if it exists)')
  p.add_argument(
    '--trust_pickle',
    action='store_true',
    help='UNSAFE: load a --pth whose pickle names Python objects beyond tensors, with the full '
    'unpickler; only for a file from a source you trust',
  )
  args = parser.parse_args(argv)

  # Imported here so --help and argument errors are instant (neither imports torch or jax).
  from vqgan_jax.convert import ConversionError  # pylint: disable=g-import-not-at-top
  from vqgan_jax.convert import torch_ckpt  # pylint: disable=g-import-not-at-top

  try:
    # The input paths first: a directory passed as --ckpt is not "torch is missing".
    if args.source == 'inception':
      torch_ckpt.require_file(args.pth, '--pth')
    else:
      torch_ckpt.require_file(args.ckpt, '--ckpt', 'the .ckpt in it, e.g. ckpts/last.ckpt')
      torch_ckpt.require_file(args.config, '--config', 'the .yaml in it, e.g. configs/model.yaml')
    if args.source == 'inception':
      from vqgan_jax.convert import inception  # pylint: disable=g-import-not-at-top

      summary = inception.convert(args.pth, args.out, trust_pickle=args.trust_pickle)
    else:
      from vqgan_jax.convert import taming  # pylint: disable=g-import-not-at-top

      summary = taming.convert_taming_checkpoint(
        args.ckpt,
        args.config,
        args.out,
        step=args.step,
        overwrite=args.overwrite,
        trust_pickle=args.trust_pickle,
      )
  except (ConversionError, OSError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2, sort_keys=True))
  print(f'converted in {summary["seconds"]:.1f} s -> {summary["out"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
