"""The embedded demo: a small VQGAN on Fashion-MNIST (32x32), minutes on 2 CPU cores.

python -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py --workdir=/tmp/fm
python -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py:smoke --workdir=/tmp/fm_smoke

`:smoke` is the tests' smoke model with the original's quantizer (what the stage-2 `:smoke`
configs pair with); `:smoke,demo` is the same size with this demo's own choices (FSQ, a fixed
GAN weight, EMA weights), which tests/test_main.py trains through `main`.

`:vqvae` is the paper's VQVAE baseline at the demo's size and budget: the original's vq
quantizer trained with the reconstruction and codebook losses only (no LPIPS, no GAN).
"""

from vqgan_jax import config_base as base


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage1_base()
  c.model.update(
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=32,
    z_channels=64,
    n_embed=256,
    embed_dim=32,
  )
  # The GAN joins for the last 20%: in a 600-step run it mostly trades L1 for texture.
  c.loss.update(disc_start=0.8, disc_weight=0.8, disc_num_layers=2, disc_ndf=32)
  c.optim.base_lr = 1e-5
  c.data.update(base.fashion_mnist_data())
  # ~10 minutes on 2 CPU cores; one eval over
  # the whole 10k test split at the end.
  c.train.update(
    batch_size=32,
    eval_batch_size=250,
    num_steps=600,
    log_every=25,
    eval_every=600,
    checkpoint_every=200,
    num_grid_images=32,
  )
  if args.get('smoke'):
    base.stage1_smoke(c)  # the original's quantizer (the tests' smoke model)
  else:
    # Each CPU conv's kernel timed once per shape on the machine that runs (kernels/tune.py;
    # the tests' smoke runs keep 'auto', which never times). On the 2-core AVX-512 VM against
    # 'auto' (whose windows were measured on AVX2): train step 890 vs 895 ms, the 10k eval's
    # batch of 250 2.41 vs 3.01 s; the first run on a new machine spends ~50 s timing.
    c.train.conv_impl = 'tuned'
  if not args.get('smoke') or args.get('demo'):
    # Measured at this budget (experiments/results/ablate_stage1.jsonl, experiments/README.md):
    # the original's vq picks ~16% of its codes; FSQ with 4 levels on 4 channels (the same
    # 256 codes) uses all of them. The adaptive GAN weight (lambda 2-12 here) then undoes
    # in the last 120 steps what L1 + LPIPS built (train rec loss 0.16 -> 0.37): a fixed
    # weight of 0.1 (MAGVIT, Open-MAGVIT2) keeps the GAN's texture without that.
    c.model.update(quantizer='fsq', fsq_levels=(4, 4, 4, 4), embed_dim=4, n_embed=256)
    c.loss.update(adaptive_weight=False, disc_weight=0.1)
    # Eval, encode and the loaders read an EMA of the weights (a ~100-step horizon): LPIPS
    # 0.128-0.129 against 0.138-0.155 for the raw weights, PSNR 20.5-20.9 against 19.1-20.6 dB
    # (two seeds each).
    c.train.params_ema_decay = 0.99
  if args.get('vqvae'):
    c.model.update(quantizer='vq', fsq_levels=(), embed_dim=32, n_embed=256)
    # D still runs after disc_start (its factor is 0: it never learns, G never sees it).
    c.loss.update(perceptual_weight=0.0, disc_factor=0.0)
  return c
