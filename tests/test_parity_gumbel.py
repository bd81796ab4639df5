"""GumbelVQ parity with the original PyTorch implementation, through the converter.

Random-init original `taming.models.vqgan.GumbelVQ` models (DummyLoss, as the Gumbel f8
release) on small configs are converted with `vqgan_jax.convert` and compared with ours
(`VQGAN(quantizer='gumbel')`) in float32 on the same inputs (NCHW <-> NHWC).

Inference: the original's GumbelQuantize adds Gumbel noise to the logits even in eval mode, so
its `forward` / `encode` are stochastic; ours takes argmax(logits) without noise (deliberately:
deterministic codes). The original side of every inference comparison is therefore assembled
from its own pieces with the hard argmax: encoder -> quant_conv -> quantize.proj -> argmax ->
quantize.get_codebook_entry -> decode. The KL term does not depend on the noise, so its
`quantize(...)` loss is compared directly.

Training forward: the original's Gumbel-softmax draws its noise from torch's RNG; we draw the
same noise (same seed, same `-log(Exponential)` formula as F.gumbel_softmax) and pass it to our
quantizer, then compare z_q, codes, loss and the straight-through gradients.

Tolerance: max |ours - original| <= 1e-4 x the output's scale (max |original|, floored).
Errors are collected in ERRORS and printed at the end of the module (-s or -rA).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

# Skips this module without the original implementation.
from parity import TOL  # noqa: E402,F401
from parity import R  # noqa: E402,F401
from parity import Recorder  # noqa: E402,F401
from parity import images_uint8  # noqa: E402,F401
from parity import nchw  # noqa: E402,F401
from parity import nhwc  # noqa: E402,F401
from parity import torch  # noqa: E402,F401
import pytest

from vqgan_jax import checkpoints  # noqa: E402
from vqgan_jax.convert import param_mapping  # noqa: E402
from vqgan_jax.convert import taming as convert  # noqa: E402
from vqgan_jax.convert import yaml_config  # noqa: E402
from vqgan_jax.models.quantizer import GumbelQuantizer  # noqa: E402
from vqgan_jax.models.vqgan import VQGAN  # noqa: E402
from vqgan_jax.train import stage1  # noqa: E402

pytestmark = pytest.mark.reference

BATCH = 2
NEAR_TIE = 1e-4  # logit gap (float64) below which float32 rounding may pick either code

CONFIGS = {
  'small': dict(
    ddconfig=dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=16
    ),
    n_embed=64,
    embed_dim=16,
    kl_weight=1e-8,
  ),
  # f4 with three levels, two blocks, a bigger codebook and a visible KL weight.
  'wide': dict(
    ddconfig=dict(
      ch=64,
      ch_mult=(1, 1, 2),
      num_res_blocks=2,
      attn_resolutions=(16,),
      resolution=32,
      z_channels=64,
    ),
    n_embed=512,
    embed_dim=64,
    kl_weight=5e-4,
  ),
}

_REC = Recorder('GumbelVQ parity errors (ours vs original, float32)')
ERRORS, INFO, _check, report = _REC.errors, _REC.info, _REC.check, _REC.report


def _images(seed, size, batch=BATCH):
  return images_uint8(seed, size, batch).astype(np.float32) / 127.5 - 1.0


def _gaps(logits):
  """(argmax, gap between the two largest logits) per position, float64."""
  lg = np.asarray(logits, np.float64)
  top2 = np.sort(lg, axis=-1)[..., -2:]
  return np.argmax(lg, axis=-1), top2[..., 1] - top2[..., 0]


class Pair:
  """An original GumbelVQ and our converted VQGAN(quantizer='gumbel')."""

  def __init__(self, name):
    spec = CONFIGS[name]
    self.tag, self.spec = f'[{name}]', spec
    self.torch = R.build_gumbelvq(
      spec['ddconfig'], spec['n_embed'], spec['embed_dim'], kl_weight=spec['kl_weight'], seed=0
    )
    self.sd = self.torch.state_dict()
    quantizer = dict(quantizer='gumbel', kl_weight=spec['kl_weight'], temperature=1.0)
    self.converted = convert.convert_vqmodel_state_dict(
      self.sd, spec['ddconfig'], spec['n_embed'], spec['embed_dim'], **quantizer
    )
    kw = yaml_config.model_fields(spec['ddconfig'], spec['n_embed'], spec['embed_dim'], **quantizer)
    self.model = VQGAN(**kw)
    self.x = _images(1, spec['ddconfig']['resolution'])

  @functools.cached_property
  def outputs(self):
    tm = self.torch.eval()
    q = tm.quantize
    with torch.no_grad():
      h = tm.encoder(nchw(self.x))
      hq = tm.quant_conv(h)
      logits = q.proj(hq)
      ind = logits.argmax(1)  # the hard argmax, no noise (see the module docstring)
      b, _, hh, ww = hq.shape
      zq = q.get_codebook_entry(ind.reshape(-1), (b, hh, ww, self.spec['embed_dim']))
      _, kl, _ = q(hq)  # the KL term does not depend on the noise
      ref = dict(
        h=nhwc(h),
        hq=nhwc(hq),
        logits=nhwc(logits),
        ind=ind.numpy(),
        zq=nhwc(zq),
        kl=kl.item(),
        dec=nhwc(tm.decode(zq)),
      )
      # The original's own eval forward, twice: stochastic codes.
      torch.manual_seed(1)
      _, _, (_, _, ind1) = q(hq)
      torch.manual_seed(2)
      _, _, (_, _, ind2) = q(hq)
      ref['noisy_ind'] = (ind1.reshape(ind.shape).numpy(), ind2.reshape(ind.shape).numpy())

    def ours(m, x, hq_ref, zq_ref, ind_ref):
      h = m.encoder(x)
      hq = m.quant_conv(h)
      xrec, kl_full, ind_full = m(x)
      return dict(
        h=h,
        hq=hq,
        logits=m.quantize.logits(hq_ref),
        own_logits=m.quantize.logits(hq),
        codes=m.quantize(hq_ref),
        dec=m.decode(zq_ref),
        xrec=xrec,
        kl_full=kl_full,
        ind_full=ind_full,
        dec_idx=m.decode_indices(ind_ref),
        enc_idx=m.encode_to_indices(x),
      )

    fn = jax.jit(lambda p, *a: self.model.apply({'params': p}, *a, method=ours))
    out = fn(self.converted['params'], self.x, ref['hq'], ref['zq'], ref['ind'])
    return ref, jax.tree.map(np.asarray, out)


pair_for = functools.cache(Pair)  # one original + converted model per config name


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def pair(request):
  return pair_for(request.param)


def test_state_dict_maps_one_to_one(pair):
  p = pair.converted['params']['quantize']
  np.testing.assert_array_equal(
    p['proj']['kernel'], pair.sd['quantize.proj.weight'].numpy()[:, :, 0, 0].T
  )
  np.testing.assert_array_equal(p['proj']['bias'], pair.sd['quantize.proj.bias'].numpy())
  np.testing.assert_array_equal(p['embed']['embedding'], pair.sd['quantize.embed.weight'].numpy())
  # ... and back: our export names and shapes are the original's, every key.
  back = param_mapping.vqmodel_to_torch_state_dict(pair.converted)
  assert set(back) == set(pair.sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, pair.sd[k].numpy(), err_msg=k)


def test_encoder_logits_and_codes(pair):
  ref, ours = pair.outputs
  tag = pair.tag
  _check(f'encoder output {tag}', ours['h'], ref['h'])
  _check(f'quant_conv output {tag}', ours['hq'], ref['hq'])
  _check(f'quantize.proj logits (same input) {tag}', ours['logits'], ref['logits'])
  _check(f'quantize.proj logits (own path) {tag}', ours['own_logits'], ref['logits'])
  zq, kl, ind = ours['codes']
  best, gap = _gaps(ref['logits'])
  np.testing.assert_array_equal(best, ref['ind'])
  clear = gap > NEAR_TIE
  assert clear.mean() > 0.9, 'almost every position should have a clear best logit'
  np.testing.assert_array_equal(ind[clear], ref['ind'][clear])
  same = ind == ref['ind']
  INFO[f'argmax codes agree {tag}'] = (
    f'{same.mean():.4f} ({(~clear).sum()} near-ties (gap <= {NEAR_TIE}) of {clear.size})'
  )
  _check(f'z_q = embed[argmax] {tag}', zq[same], ref['zq'][same])
  _check(f'KL loss {tag}', kl, ref['kl'], floor=1e-12)
  # Codes from our own encoder path agree wherever the original's gap is clear.
  np.testing.assert_array_equal(ours['enc_idx'][clear], ref['ind'][clear])


def test_original_eval_encoding_is_stochastic(pair):
  """Why we compare against the original's pieces: its eval forward samples codes."""
  ref, _ = pair.outputs
  a, b = ref['noisy_ind']
  assert not np.array_equal(a, b), 'the original eval forward was expected to add noise'
  INFO[f'original eval codes = argmax codes {pair.tag}'] = (
    f'{np.mean(a == ref["ind"]):.3f} / {np.mean(b == ref["ind"]):.3f} (two noise draws); '
    f'two draws agree {np.mean(a == b):.3f}'
  )


def test_decoder_and_decode_indices(pair):
  ref, ours = pair.outputs
  _check(f'decoder output {pair.tag}', ours['dec'], ref['dec'])
  _check(f'decode_indices {pair.tag}', ours['dec_idx'], ref['dec'])


def test_full_eval_forward_with_argmax_codes(pair):
  ref, ours = pair.outputs
  if not np.array_equal(ours['ind_full'], ref['ind']):
    pytest.skip('a near-tie code differs; the decoder is compared on shared codes above')
  _check(f'eval forward xrec (argmax codes) {pair.tag}', ours['xrec'], ref['dec'])
  _check(f'eval forward KL loss {pair.tag}', ours['kl_full'], ref['kl'], floor=1e-12)


@pytest.mark.parametrize('tau', [1.0, 0.5])
def test_training_forward_with_the_same_noise(pair, tau):
  """Gumbel-softmax, straight-through hard one-hot, KL x kl_weight and their gradients."""
  ref, _ = pair.outputs
  q = pair.torch.quantize
  hq = torch.from_numpy(np.ascontiguousarray(ref['hq'].transpose(0, 3, 1, 2))).requires_grad_()
  with torch.no_grad():
    logits_shape = q.proj(hq).shape
  torch.manual_seed(123)
  gumbels = -torch.empty(logits_shape).exponential_().log()  # F.gumbel_softmax's draw
  q.train()
  try:
    q.zero_grad()
    torch.manual_seed(123)
    zq_t, kl_t, (_, _, ind_t) = q(hq, temp=tau)
  finally:
    q.eval()
  rng = np.random.default_rng(7)
  ct = rng.normal(size=zq_t.shape).astype(np.float32)  # a cotangent for z_q (NCHW)
  w_kl = 1.0 / pair.spec['kl_weight']  # make the KL gradient visible
  (torch.sum(zq_t * torch.from_numpy(ct)) + w_kl * kl_t).backward()
  ref_grads = {
    'hq': nhwc(hq.grad),
    'proj_kernel': q.proj.weight.grad.numpy()[:, :, 0, 0].T,
    'proj_bias': q.proj.bias.grad.numpy(),
    'embed': q.embed.weight.grad.numpy(),
  }

  quant = GumbelQuantizer(pair.spec['n_embed'], pair.spec['embed_dim'], pair.spec['kl_weight'])
  qparams = pair.converted['params']['quantize']
  g = jnp.asarray(gumbels.numpy().transpose(0, 2, 3, 1))

  def f(qp, z):
    zq, kl, ind = quant.apply({'params': qp}, z, train=True, gumbels=g, temperature=tau)
    return (zq, kl), ind

  (zq, kl), vjp, ind = jax.vjp(f, qparams, jnp.asarray(ref['hq']), has_aux=True)
  gq, gz = vjp((jnp.asarray(ct.transpose(0, 2, 3, 1)), jnp.asarray(w_kl, jnp.float32)))
  tag = f'{pair.tag} tau={tau}'
  np.testing.assert_array_equal(np.asarray(ind), ind_t.numpy().reshape(ind.shape))
  _check(f'train z_q {tag}', zq, nhwc(zq_t))
  _check(f'train KL loss {tag}', kl, kl_t.item(), floor=1e-12)
  _check(f'train grad wrt quant_conv output {tag}', gz, ref_grads['hq'])
  _check(f'train grad proj kernel {tag}', gq['proj']['kernel'], ref_grads['proj_kernel'])
  _check(f'train grad proj bias {tag}', gq['proj']['bias'], ref_grads['proj_bias'])
  _check(f'train grad embed {tag}', gq['embed']['embedding'], ref_grads['embed'])


def test_temperature_schedule_matches_the_original():
  from taming.lr_scheduler import LambdaWarmUpCosineScheduler  # pylint: disable=g-import-not-at-top

  for cfg in (
    R.GUMBEL_F8_TEMPERATURE_SCHEDULE,
    {
      'target': yaml_config.COSINE_SCHEDULER,
      'params': dict(warm_up_steps=10, lr_start=0.1, lr_max=2.0, lr_min=0.01, max_decay_steps=50),
    },
  ):
    sched = LambdaWarmUpCosineScheduler(**cfg['params'])
    for step in (0, 3, 10, 11, 30, 49, 50, 51, 500_000, 2_000_000):
      assert yaml_config.gumbel_temperature(cfg, step) == pytest.approx(sched(step), rel=1e-12)
  assert yaml_config.gumbel_temperature(None, 123) == 1.0


# ---------------------------------------------------------------------------------------------
# The Lightning checkpoint -> stage-1 workdir
# ---------------------------------------------------------------------------------------------


def test_cli_converts_a_gumbelvq_checkpoint(tmp_path):
  import yaml  # pylint: disable=g-import-not-at-top

  from vqgan_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top

  pair = pair_for('small')
  spec = pair.spec
  step = 250_000
  torch.save({'state_dict': pair.sd, 'global_step': step, 'epoch': 3}, tmp_path / 'last.ckpt')
  ddconfig = dict(R.DEFAULT_DDCONFIG, **spec['ddconfig'])
  ddconfig = {k: list(v) if isinstance(v, tuple) else v for k, v in ddconfig.items()}
  yml = {
    'model': {
      'base_learning_rate': 4.5e-6,
      'target': yaml_config.GUMBEL_TARGET,
      'params': {
        'kl_weight': spec['kl_weight'],
        'embed_dim': spec['embed_dim'],
        'n_embed': spec['n_embed'],
        'monitor': 'val/rec_loss',
        'ddconfig': ddconfig,
        'temperature_scheduler_config': R.GUMBEL_F8_TEMPERATURE_SCHEDULE,
        'lossconfig': {'target': R.DUMMY_LOSS_TARGET},
      },
    }
  }
  with open(tmp_path / 'model.yaml', 'w') as f:
    yaml.safe_dump(yml, f)
  out = tmp_path / 'out'
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
  with open(out / 'config.json') as f:
    saved = json.load(f)
  m = saved['model']
  assert (m['quantizer'], m['kl_weight'], m['n_embed'], m['embed_dim']) == (
    'gumbel',
    spec['kl_weight'],
    spec['n_embed'],
    spec['embed_dim'],
  )
  # The temperature the original would train with at its next step.
  from taming.lr_scheduler import LambdaWarmUpCosineScheduler  # pylint: disable=g-import-not-at-top

  want = LambdaWarmUpCosineScheduler(**R.GUMBEL_F8_TEMPERATURE_SCHEDULE['params'])(step)
  assert m['temperature'] == pytest.approx(want, rel=1e-12)
  # The workdir restores as a stage-1 training state (what init_from / resuming read), and the
  # restored model encodes like the directly converted one.
  config = yaml_config.stage1_config(
    spec['ddconfig'],
    spec['n_embed'],
    spec['embed_dim'],
    quantizer='gumbel',
    kl_weight=spec['kl_weight'],
    temperature=want,
  )
  models = stage1.build_models(config)
  assert models.vqgan.quantizer == 'gumbel'
  abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), jax.random.PRNGKey(0))
  with checkpoints.Checkpointer(out, read_only=True) as ckpt:
    assert ckpt.all_steps() == [step]
    state, _, _ = ckpt.restore(checkpoints.abstract_like(abstract), config=config)
  jax.tree.map(np.testing.assert_array_equal, state['params'], pair.converted['params'])
  ref, ours = pair.outputs
  idx = models.vqgan.apply({'params': state['params']}, pair.x, method='encode_to_indices')
  np.testing.assert_array_equal(idx, ours['enc_idx'])
  # A VQ config cannot resume it (the compatibility check names the field).
  vq_config = yaml_config.stage1_config(spec['ddconfig'], spec['n_embed'], spec['embed_dim'])
  with checkpoints.Checkpointer(out, read_only=True) as ckpt:
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match='model.quantizer'):
      ckpt.restore(checkpoints.abstract_like(abstract), config=vq_config)
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json']
  # Stage 2 (encode / train / sample) builds its frozen first stage from the stage-2 config's
  # stage1_config, checked against this workdir's saved config: the quantizer must agree ...
  from vqgan_jax import config_base  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import stage2  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import stage2_config  # pylint: disable=g-import-not-at-top
  from vqgan_jax.validate import ConfigError  # pylint: disable=g-import-not-at-top

  c = config_base.stage2_base()
  c.stage1_workdir = str(out)
  c.stage1_config.update(
    **yaml_config.model_fields(spec['ddconfig'], spec['n_embed'], spec['embed_dim'])
  )
  c.data.image_size = spec['ddconfig']['resolution']
  with pytest.raises(ConfigError, match="quantizer='vq' but the checkpoint .* 'gumbel'"):
    stage2_config.resolve_config(c)
  # ... and then the first stage is the Gumbel model, its params restore, codes are argmax codes.
  c.stage1_config.quantizer = 'gumbel'
  resolved = stage2_config.resolve_config(c)
  vqgan = vqgan_lib.from_config(resolved.stage1_config, frozen=True)
  assert vqgan.quantizer == 'gumbel'
  abstract_p = jax.eval_shape(lambda r: vqgan.init(r, pair.x)['params'], jax.random.PRNGKey(0))
  params = checkpoints.restore_params(out, checkpoints.abstract_like(abstract_p))
  u8 = np.round((pair.x + 1.0) * 127.5).astype(np.uint8)
  codes = stage2.image_codes(vqgan, params, u8)
  want = models.vqgan.apply(
    {'params': state['params']}, u8.astype(np.float32) / 127.5 - 1.0, method='encode_to_indices'
  )
  np.testing.assert_array_equal(codes, np.asarray(want).reshape(len(u8), -1))
