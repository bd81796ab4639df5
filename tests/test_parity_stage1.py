"""Stage-1 parity with the original PyTorch VQGAN, through the converter.

Random-init original modules on small configs are converted with `vqgan_jax.convert` and
compared with ours in float32 on the same inputs (NCHW <-> NHWC): encoder, quant_conv,
codes, decoder, the whole VQModel, the discriminator (train and eval mode), LPIPS, every
logged term of `VQLPIPSWithDiscriminator`, and one full training iteration.

Tolerance: max |ours - original| <= 1e-4 x the output's scale (max |original|, floored).
The errors are collected in ERRORS and printed at the end of the module (pytest -s, or the
`parity errors` section of -rA).
"""

import copy
import functools

import jax
import numpy as np

# Skips this module without the original implementation.
from parity import TOL  # noqa: E402
from parity import R  # noqa: E402
from parity import Recorder  # noqa: E402
from parity import images_uint8  # noqa: E402
from parity import nchw  # noqa: E402
from parity import nhwc  # noqa: E402
from parity import torch  # noqa: E402
import pytest

from vqgan_jax.convert import param_mapping  # noqa: E402
from vqgan_jax.convert import taming as convert  # noqa: E402
from vqgan_jax.convert import yaml_config  # noqa: E402
from vqgan_jax.models import lpips as lpips_lib  # noqa: E402
from vqgan_jax.train import stage1  # noqa: E402

pytestmark = pytest.mark.reference

LR = 1e-3  # one Adam step moves weights visibly; also the fine-tuning test's lr
BATCH = 2

# Two original configs: the small one also runs the loss terms and a training iteration.
CONFIGS = {
  'small': dict(
    ddconfig=dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=16
    ),
    n_embed=32,
    embed_dim=8,
    loss=dict(disc_start=0, disc_weight=0.8, disc_num_layers=2, disc_ndf=16),
  ),
  'wide': dict(
    ddconfig=dict(
      ch=64,
      ch_mult=(1, 1, 2),
      num_res_blocks=2,
      attn_resolutions=(16,),
      resolution=32,
      z_channels=64,
    ),
    n_embed=256,
    embed_dim=64,
    loss=dict(disc_start=0, disc_weight=0.75, disc_num_layers=3, disc_ndf=16),
  ),
}

_REC = Recorder('parity errors (ours vs original, float32)')
ERRORS, INFO, _check, report = _REC.errors, _REC.info, _REC.check, _REC.report
_check_original = _REC.check_original


def _images(seed, size, batch=BATCH):
  return images_uint8(seed, size, batch)


class Pair:
  """An original VQModel and the converted params/config/models of ours."""

  def __init__(self, name):
    spec = CONFIGS[name]
    self.tag = f'[{name}]'
    self.spec = spec
    self.torch = R.build_vqmodel(
      spec['ddconfig'], spec['n_embed'], spec['embed_dim'], spec['loss'], seed=0
    )
    # Dropout inside LPIPS's heads off for good (Lightning's train() would re-enable it).
    for m in self.torch.loss.perceptual_loss.modules():
      if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
    sd = self.torch.state_dict()
    self.converted = convert.convert_vqmodel_state_dict(
      sd, spec['ddconfig'], spec['n_embed'], spec['embed_dim']
    )
    config = yaml_config.stage1_config(
      spec['ddconfig'],
      spec['n_embed'],
      spec['embed_dim'],
      {'target': R.VQLPIPS_TARGET, 'params': spec['loss']},
    )
    config.loss.lpips_dropout = False
    config.optim.update(base_lr=LR, scale_lr=False)
    config.train.batch_size = BATCH
    self.config = config
    self.models = stage1.build_models(config)
    self.size = spec['ddconfig']['resolution']
    u8 = _images(1, self.size)
    self.u8 = u8
    self.x = u8.astype(np.float32) / 127.5 - 1.0  # exactly what the train step computes

  @functools.cached_property
  def outputs(self):
    """Every intermediate of the original and of ours (one compiled function), computed once.

    Ours also quantizes the original's quant_conv output and decodes the original's z_q, so
    codes and the decoder are compared on identical inputs.
    """
    tm = self.torch
    with torch.no_grad():
      x = nchw(self.x)
      h = tm.encoder(x)
      hq = tm.quant_conv(h)
      zq, qloss, (_, _, ind) = tm.quantize(hq)
      ref = dict(
        h=nhwc(h),
        hq=nhwc(hq),
        zq=nhwc(zq),
        qloss=qloss.item(),
        ind=ind.numpy().reshape(self.x.shape[0], *hq.shape[2:]),
        dec=nhwc(tm.decode(zq)),
        codebook=tm.quantize.embedding.weight.detach().numpy(),
      )
      xrec, qloss_full = tm(x)
      ref.update(xrec=nhwc(xrec), qloss_full=qloss_full.item())

    def ours(m, x, hq_ref, zq_ref):
      h = m.encoder(x)
      hq = m.quant_conv(h)
      xrec, qloss, ind = m(x)
      return dict(
        h=h,
        hq=hq,
        own_codes=m.quantize(hq),
        codes=m.quantize(hq_ref),
        dec=m.decode(zq_ref),
        xrec=xrec,
        qloss_full=qloss,
        ind_full=ind,
      )

    fn = jax.jit(lambda p, *a: self.models.vqgan.apply({'params': p}, *a, method=ours))
    out = fn(self.converted['params'], self.x, ref['hq'], ref['zq'])
    return ref, jax.tree.map(np.asarray, out)


pair_for = functools.cache(Pair)  # one original + converted model per config name


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def pair(request):
  return pair_for(request.param)


@pytest.fixture(scope='module')
def small():
  return pair_for('small')


def _code_gaps(z, codebook):
  """(best index, gap to the second best) of the expanded-form distances, in float64."""
  z = z.reshape(-1, z.shape[-1]).astype(np.float64)
  e = codebook.astype(np.float64)
  d = (z**2).sum(1, keepdims=True) + (e**2).sum(1) - 2 * z @ e.T
  part = np.sort(d, axis=1)
  return np.argmin(d, axis=1), part[:, 1] - part[:, 0]


def test_encoder_quant_conv_and_codes(pair):
  ref, ours = pair.outputs
  tag = pair.tag
  _check(f'encoder output {tag}', ours['h'], ref['h'])
  _check(f'quant_conv output {tag}', ours['hq'], ref['hq'])
  # Codes of the *same* quant_conv output (the original's) on both sides.
  zq, qloss, ind = ours['codes']
  _, gap = _code_gaps(ref['hq'], ref['codebook'])
  clear = gap.reshape(ind.shape) > 1e-4
  assert clear.mean() > 0.9, 'almost every code should have a clear best distance'
  np.testing.assert_array_equal(ind[clear], ref['ind'][clear])
  same = ind == ref['ind']
  INFO[f'code indices agree {tag}'] = (
    f'{same.mean():.4f} ({(~clear).sum()} near-ties of {clear.size} codes)'
  )
  _check(f'quantized z_q {tag}', zq[same], ref['zq'][same])
  _check(f'quantizer loss {tag}', qloss, ref['qloss'])
  # Our own quant_conv output gives the same codes wherever the gap is clear.
  np.testing.assert_array_equal(ours['own_codes'][2][clear], ref['ind'][clear])


def test_decoder(pair):
  ref, ours = pair.outputs
  _check(f'decoder output {pair.tag}', ours['dec'], ref['dec'])


def test_vqmodel_forward(pair):
  ref, ours = pair.outputs
  if not np.array_equal(ours['ind_full'], ref['ind']):
    pytest.skip('a near-tie code differs; the decoder is compared on shared codes above')
  _check(f'VQModel xrec {pair.tag}', ours['xrec'], ref['xrec'])
  _check(f'VQModel qloss {pair.tag}', ours['qloss_full'], ref['qloss_full'])


def test_cpu_conv_kernels_match_the_original():
  """The demo trains on one CPU device, where the convs run as Winograd and patch matmuls
  (`conv_impl='auto'` there; the suite's 8 devices would take XLA's): 'cpu' forces that path
  (its 64-channel 3x3 convs at 32x32 and 16x16 are Winograd's) against the original."""
  wide = pair_for('wide')
  ref, _ = wide.outputs
  config = wide.config.copy_and_resolve_references()
  config.train.conv_impl = 'cpu'
  model = stage1.build_models(config).vqgan
  assert model.conv_impl == 'cpu'

  def ours(m, x, zq_ref):
    return m.quant_conv(m.encoder(x)), m.decode(zq_ref)

  fn = jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=ours))
  hq, dec = fn(wide.converted['params'], wide.x, ref['zq'])
  _check('quant_conv output [wide, cpu kernels]', hq, ref['hq'])
  _check('decoder output [wide, cpu kernels]', dec, ref['dec'])


def test_discriminator_train_and_eval_mode(pair):
  tag = f'[{pair.spec["loss"]["disc_num_layers"]} layers]'
  disc = copy.deepcopy(pair.torch.loss.discriminator).train()
  ours = pair.models.disc
  variables = {'params': pair.converted['disc_params'], 'batch_stats': pair.converted['disc_stats']}
  x1, x2 = pair.x, _images(2, pair.size).astype(np.float32) / 127.5 - 1.0
  with torch.no_grad():
    logits_train = disc(nchw(x1))  # batch statistics; updates the running ones
  out, upd = jax.jit(lambda v, x: ours.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, x1
  )
  _check(f'D logits, train mode {tag}', out, nhwc(logits_train))
  for idx in [i for i, m in enumerate(disc.main) if isinstance(m, torch.nn.BatchNorm2d)]:
    bn = disc.main[idx]
    _check(
      f'D running_mean main.{idx} {tag}',
      upd['batch_stats'][f'main_{idx}']['mean'],
      bn.running_mean.numpy(),
    )
    _check(
      f'D running_var main.{idx} (unbiased) {tag}',
      upd['batch_stats'][f'main_{idx}']['var'],
      bn.running_var.numpy(),
    )
  disc.eval()
  with torch.no_grad():
    logits_eval = disc(nchw(x2))
  out_eval = jax.jit(lambda v, x: ours.apply(v, x, train=False))(
    {'params': variables['params'], 'batch_stats': upd['batch_stats']}, x2
  )
  _check(f'D logits, eval mode (running stats) {tag}', out_eval, nhwc(logits_eval))


def test_lpips_distance(small):
  lp = small.torch.loss.perceptual_loss.eval()
  x, y = small.x, _images(3, small.size).astype(np.float32) / 127.5 - 1.0
  with torch.no_grad():
    d = lp(nchw(x), nchw(y)).reshape(-1).numpy()
  ours = jax.jit(lambda p, a, b: lpips_lib.LPIPS().apply({'params': p}, a, b))(
    small.converted['lpips_params'], x, y
  )
  _check('LPIPS distance', ours, d)
  # The checkpoint's LPIPS equals the bundled one our training loads.
  ref = lpips_lib.load_pretrained_params()
  jax.tree.map(np.testing.assert_array_equal, small.converted['lpips_params'], ref)


# ---------------------------------------------------------------------------------------------
# Loss terms and one training iteration (small config)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def small_step(small):
  """Our fused train step (disc_start 0, LPIPS dropout off), jitted once for the module."""
  return jax.jit(functools.partial(stage1.train_step, small.config, small.models, 0))


@pytest.fixture(scope='module')
def lpips_params():
  return lpips_lib.load_pretrained_params()


@pytest.fixture(scope='module')
def our_step(small, small_step, lpips_params):
  """Our step from the converted weights: (state before, state after, metrics)."""
  state = convert.stage1_state(small.config, small.converted, step=0)
  new_state, metrics = small_step(state, lpips_params, small.u8)
  return state, jax.tree.map(np.asarray, new_state), {k: float(v) for k, v in metrics.items()}


def _original_logs(small, dtype):
  """The original loss's logs at the converted weights, computed in `dtype`: G pass, then D
  pass on the same xrec."""
  model = copy.deepcopy(small.torch).to(dtype).train()
  model.loss.perceptual_loss.eval()
  x = nchw(small.x).to(dtype)
  xrec, qloss = model(x)
  _, log_g = model.loss(qloss, x, xrec, 0, 0, last_layer=model.get_last_layer(), split='train')
  with torch.no_grad():
    _, log_d = model.loss(
      qloss, x, xrec.detach(), 1, 0, last_layer=model.get_last_layer(), split='train'
    )
  l1 = float(torch.mean(torch.abs(x - xrec.detach())))
  logs = {k.split('/')[1]: float(v) for k, v in {**log_g, **log_d}.items()}
  return logs, l1


@pytest.fixture(scope='module')
def original_logs(small):
  """(float32 logs, L1), (float64 logs, L1) of the original (see `_check_original`)."""
  return _original_logs(small, torch.float32), _original_logs(small, torch.float64)


GEN_TERMS = ('total_loss', 'quant_loss', 'nll_loss', 'p_loss', 'd_weight', 'disc_factor', 'g_loss')
DISC_TERMS = ('disc_loss', 'logits_real', 'logits_fake')


@pytest.mark.parametrize('term', GEN_TERMS + ('rec_loss',) + DISC_TERMS)
def test_loss_terms(our_step, original_logs, term):
  _, _, metrics = our_step
  (logs, l1), (logs64, l1_64) = original_logs
  if term == 'rec_loss':
    # The original logs rec_loss after adding the perceptual term (= nll_loss before the
    # mean); ours logs the L1 alone.
    _check_original(
      'loss rec_loss (original: L1 + p)',
      metrics['rec_loss'] + metrics['p_loss'],
      logs['rec_loss'],
      logs64['rec_loss'],
    )
    _check_original('loss L1', metrics['rec_loss'], l1, l1_64)
    return
  which = 'G pass' if term in GEN_TERMS else 'D pass, same xrec'
  _check_original(f'loss {term} ({which})', metrics[term], logs[term], logs64[term])


def _torch_params(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _adam_first_moments(opt, module):
  """{state-dict key: exp_avg} of the params `opt` updated."""
  by_id = {id(p): k for k, p in module.named_parameters()}
  return {by_id[id(p)]: s['exp_avg'].numpy().copy() for p, s in opt.state.items() if id(p) in by_id}


def _compare_trees(label, ours_tree, torch_sd, collection='params', floor=1e-2, exact_sd=None):
  """Leaf by leaf, max |ours - torch| <= TOL x max(max |torch leaf|, floor); records the worst.

  floor=None: 1% of the largest entry of the whole tree (for gradients, whose mathematically
  zero leaves hold float noise only). exact_sd: the original in float64; a leaf whose float32
  value is itself further than the tolerance from it is compared with it instead (see
  `parity.Recorder.check_original`)."""
  ref = param_mapping.to_torch_layout({collection: ours_tree})
  if floor is None:
    floor = 1e-2 * max(float(np.max(np.abs(torch_sd[k]))) for k in ref)
  worst, exact_used = (0.0, 1.0, ''), []
  for k, v in ref.items():
    t = torch_sd[k]
    scale = max(float(np.max(np.abs(t))), floor)
    if exact_sd is not None and float(np.max(np.abs(t - exact_sd[k]))) > TOL * scale:
      t = exact_sd[k]
      exact_used.append(k)
    err = float(np.max(np.abs(v - t)))
    if err / scale >= worst[0] / worst[1]:
      worst = (err, scale, k)
  ERRORS[label] = worst[:2]
  if exact_used:
    INFO[
      f'{label}: compared with the original in float64 (its float32 is off by more than '
      'the tolerance)'
    ] = ', '.join(exact_used)
  assert worst[0] <= TOL * worst[1], f'{label}: {worst[2]} off by {worst[0]:.3g}'
  return exact_used


# Adam's first step moves a weight by lr * g / (|g| + 1e-8): for gradients that are float
# noise (mathematically zero: attention key biases, biases right before a 1-channel GroupNorm
# group) its sign is arbitrary on both sides. Params are compared exactly where |g| > 1e-5
# and only bounded by one step elsewhere.
CLEAR_GRAD = 1e-5


def _compare_adam_step(label, ours_params, ours_mu, torch_params, torch_mu, exact=None):
  """exact: (params, first moments) of the same step in float64; leaves whose float32
  gradient is off the float64 one by more than the tolerance are compared with it."""
  # Gradients via the first moments (0.5 * g on both sides).
  inexact = _compare_trees(
    f'{label} gradient (Adam 1st moment)',
    ours_mu,
    torch_mu,
    floor=None,
    exact_sd=exact and exact[1],
  )
  if inexact:
    torch_params = {**torch_params, **{k: exact[0][k] for k in inexact}}
  ours = param_mapping.to_torch_layout({'params': ours_params})
  mu = param_mapping.to_torch_layout({'params': ours_mu})
  worst, noisy, total = (0.0, 1.0, ''), 0, 0
  for k, v in ours.items():
    t = torch_params[k]
    clear = np.abs(mu[k]) > 0.5 * CLEAR_GRAD
    noisy += int((~clear).sum())
    total += clear.size
    assert np.max(np.abs(v - t)) <= 2.01 * LR, f'{label}: {k} differs by more than one step'
    if clear.any():
      err = float(np.max(np.abs(v - t)[clear]))
      scale = max(float(np.max(np.abs(t))), 1e-2)
      if err / scale >= worst[0] / worst[1]:
        worst = (err, scale, k)
  ERRORS[f'{label} params (|g| > {CLEAR_GRAD:g}; {noisy}/{total} noise-grad entries)'] = worst[:2]
  assert worst[0] <= TOL * worst[1], f'{label}: {worst[2]} off by {worst[0]:.3g}'


def test_one_iteration_autoencoder(small, our_step):
  """original_stage1_step vs our step from identical weights: AE params and Adam moments."""
  _, after, _ = our_step
  model = copy.deepcopy(small.torch)
  opts = R.make_optimizers(model, LR)
  R.original_stage1_step(model, opts, small.x, global_step=0, channels_last=True)
  sd = _torch_params(model)
  # The same iteration in float64: the original's exact gradients (see `_check_original`).
  model64 = copy.deepcopy(small.torch).double()
  opts64 = R.make_optimizers(model64, LR)
  R.original_stage1_step(
    model64,
    opts64,
    torch.from_numpy(np.asarray(small.x, np.float64)),
    global_step=0,
    channels_last=True,
  )
  _compare_adam_step(
    'one step: AE',
    after['params'],
    after['opt_state'][0].mu,
    sd,
    _adam_first_moments(opts[0], model),
    exact=(_torch_params(model64), _adam_first_moments(opts64[0], model64)),
  )
  # For the record (not asserted): the original trains D on the post-update reconstruction.
  ours_d = param_mapping.to_torch_layout({'params': after['disc_params']}, 'loss.discriminator.')
  err = max(float(np.max(np.abs(v - sd[k]))) for k, v in ours_d.items())
  INFO['D params vs the original step (fresh xrec), not asserted'] = (
    f'max abs {err:.3g} (lr {LR:g})'
  )


def test_one_iteration_discriminator_on_same_reconstruction(small, our_step):
  """Our D update vs the original's optimizer_idx=1 pass fed the pre-update reconstruction
  (our step's documented choice), after the same G pass."""
  _, after, _ = our_step
  model = copy.deepcopy(small.torch).train()
  opt_ae, opt_d = R.make_optimizers(model, LR)
  x = nchw(small.x)
  R._toggle_optimizer(model, opt_ae)  # pylint: disable=protected-access
  xrec, qloss = model(x)
  loss, _ = model.loss(qloss, x, xrec, 0, 0, last_layer=model.get_last_layer())
  loss.backward()
  opt_ae.step()
  opt_ae.zero_grad()
  xrec = xrec.detach()
  # Running stats: ours see fake (G pass) then real; the original D pass then adds a fake.
  disc_after_real = copy.deepcopy(model.loss.discriminator)
  with torch.no_grad():
    disc_after_real(x)
  R._toggle_optimizer(model, opt_d)  # pylint: disable=protected-access
  d_loss, _ = model.loss(qloss.detach(), x, xrec, 1, 0, last_layer=model.get_last_layer())
  d_loss.backward()
  opt_d.step()
  disc = model.loss.discriminator
  _compare_adam_step(
    'one step: D (same xrec)',
    after['disc_params'],
    after['disc_opt_state'][0].mu,
    _torch_params(disc),
    _adam_first_moments(opt_d, disc),
  )
  _compare_trees(
    'one step: D running stats (fake, real)',
    after['disc_stats'],
    _torch_params(disc_after_real),
    collection='batch_stats',
  )


# ---------------------------------------------------------------------------------------------
# Fine-tuning a converted original model (here to reuse the compiled step)
# ---------------------------------------------------------------------------------------------

FM_DIR = '/usr/share/datasets/fashion-mnist'
FT_STEPS, FT_PROBES = 12, 4  # batches of BATCH images (the compiled step's shape)


def test_finetune_converted_original_on_fashion_mnist(small, small_step, lpips_params, tmp_path):
  """Original .ckpt -> CLI -> `init_from` (restore_params, fresh optimizer and D, as the loop
  does) -> our stage-1 step on real Fashion-MNIST batches: the held-out loss goes down."""
  import yaml  # pylint: disable=g-import-not-at-top

  from vqgan_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vqgan_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data import builders  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  try:
    images, _ = builders.load_fashion_mnist(FM_DIR, 'train')
  except builders.DataError as e:
    pytest.skip(f'Fashion-MNIST not available: {e}')
  spec = small.spec
  torch.save({'state_dict': small.torch.state_dict(), 'global_step': 0}, tmp_path / 'last.ckpt')
  ddconfig = dict(R.DEFAULT_DDCONFIG, **spec['ddconfig'])
  ddconfig.update(
    ch_mult=list(ddconfig['ch_mult']), attn_resolutions=list(ddconfig['attn_resolutions'])
  )
  with open(tmp_path / 'model.yaml', 'w') as f:
    yaml.safe_dump(
      {
        'model': {
          'target': 'taming.models.vqgan.VQModel',
          'params': {
            'ddconfig': ddconfig,
            'n_embed': spec['n_embed'],
            'embed_dim': spec['embed_dim'],
            'lossconfig': {'target': R.VQLPIPS_TARGET, 'params': spec['loss']},
          },
        }
      },
      f,
    )
  out = tmp_path / 'converted'
  assert (
    cli.main(
      [
        'taming',
        '--ckpt',
        str(tmp_path / 'last.ckpt'),
        '--config',
        str(tmp_path / 'model.yaml'),
        '--out',
        str(out),
      ]
    )
    == 0
  )
  abstract = jax.eval_shape(
    lambda r: stage1.init_state(small.config, small.models, r), jax.random.PRNGKey(0)
  )
  params = checkpoints.restore_params(out, checkpoints.abstract_like(abstract['params']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), small.converted['params'])
  state = convert.stage1_state(small.config, {'params': jax.device_get(params)}, step=0)

  size = spec['ddconfig']['resolution']
  batches = [
    np.stack([pipeline.preprocess(im, size) for im in images[i * BATCH : (i + 1) * BATCH]])
    for i in range(FT_STEPS + FT_PROBES)
  ]
  held_out = batches[FT_STEPS:]
  # The step reports the loss at the params it starts from: probe held-out batches (dropping
  # the probes' updates) before and after training.
  probe = lambda s: np.mean(
    [float(small_step(s, lpips_params, b)[1]['nll_loss']) for b in held_out]
  )
  nll_before = probe(state)
  for b in batches[:FT_STEPS]:
    state, metrics = small_step(state, lpips_params, b)
    assert np.isfinite(float(metrics['total_loss']))
  nll_after = probe(state)
  INFO['fine-tune held-out nll'] = f'{nll_before:.4f} -> {nll_after:.4f} in {FT_STEPS} steps'
  assert nll_after < 0.9 * nll_before, (nll_before, nll_after)
