"""Shapes, parameter names and the quantizer's math of the stage-1 modules."""

from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.models.quantizer import GumbelQuantizer
from vqgan_jax.models.quantizer import VectorQuantizer
from vqgan_jax.models.quantizer import codebook_distances
from vqgan_jax.models.quantizer import gumbel_kl_loss
from vqgan_jax.models.quantizer import gumbel_softmax
from vqgan_jax.models.quantizer import vq_loss
from vqgan_jax.models.vqgan import VQGAN

CONFIGS = {
  # taming-spec g.2's small config
  'spec_small': dict(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
    z_channels=16,
    n_embed=32,
    embed_dim=8,
  ),
  'f4_attn8': dict(
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(8,),
    resolution=32,
    z_channels=32,
    n_embed=64,
    embed_dim=16,
  ),
  'f8_no_attn_levels': dict(
    ch=32,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=64,
    z_channels=8,
    n_embed=16,
    embed_dim=4,
  ),
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_vqgan_shapes(name):
  kw = CONFIGS[name]
  model = VQGAN(**kw)
  f = 2 ** (len(kw['ch_mult']) - 1)
  r = kw['resolution']
  x = jax.random.uniform(jax.random.key(1), (2, r, r, 3), minval=-1, maxval=1)
  params = model.init(jax.random.key(0), x)['params']
  xrec, qloss, idx = model.apply({'params': params}, x)
  assert xrec.shape == x.shape and qloss.shape == () and idx.shape == (2, r // f, r // f)
  z_q, _, idx2 = model.apply({'params': params}, x, method='encode')
  assert z_q.shape == (2, r // f, r // f, kw['embed_dim'])
  np.testing.assert_array_equal(idx, idx2)
  np.testing.assert_array_equal(model.apply({'params': params}, x, method='encode_to_indices'), idx)
  # decode_indices(encode_to_indices(x)) is the reconstruction, up to the straight-through
  # rounding: z + (z_q - z) is not z_q bit for bit, and the decoder amplifies that (1.1e-5 at
  # output scale ~0.5 on an AVX-only CPU).
  np.testing.assert_allclose(
    model.apply({'params': params}, idx, method='decode_indices'), xrec, atol=5e-5
  )
  # Fully convolutional: twice the resolution works, attention placement unchanged.
  x2 = jnp.zeros((1, 2 * r, 2 * r, 3))
  assert model.apply({'params': params}, x2)[0].shape == x2.shape


def test_param_names_follow_the_state_dict():
  """Every flax path is the torch key with `.i.` indices folded into `_i`."""
  model = VQGAN(**CONFIGS['spec_small'])
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  names = {'/'.join(k): v.shape for k, v in flatten_dict(params).items()}
  assert names['encoder/down_1/block_0/nin_shortcut/kernel'] == (1, 1, 32, 64)
  assert names['encoder/down_1/attn_0/q/kernel'] == (64, 64)
  assert names['encoder/down_0/downsample/conv/kernel'] == (3, 3, 32, 32)
  assert names['decoder/up_1/upsample/conv/kernel'] == (3, 3, 64, 64)
  assert names['decoder/up_0/block_0/nin_shortcut/kernel'] == (1, 1, 64, 32)
  assert names['decoder/conv_out/kernel'] == (3, 3, 32, 3)
  assert names['quantize/embedding/embedding'] == (32, 8)
  assert names['quant_conv/kernel'] == (1, 1, 16, 8)
  assert names['post_quant_conv/kernel'] == (1, 1, 8, 16)
  # decoder.up.1 has num_res_blocks + 1 = 2 blocks each followed by attention; up.0 none.
  assert 'decoder/up_1/attn_1/proj_out/kernel' in names
  assert not any(n.startswith('decoder/up_0/attn') for n in names)
  assert not any('upsample' in n for n in names if n.startswith('decoder/up_0'))
  # Tensor count of the spec's table (g.2): encoder 62, decoder 88, quantizer + 1x1 convs 5.
  assert len(names) == 155


def test_downsample_pads_right_and_bottom_only():
  """A stride-2 3x3 conv after (0,1) padding: output pixel (0,0) sees input rows/cols 0..2."""
  from vqgan_jax.models.layers import Downsample

  m = Downsample()
  x = jnp.zeros((1, 4, 4, 1))
  p = m.init(jax.random.key(0), x)
  p = jax.tree.map(jnp.ones_like, p)
  x = x.at[0, 3, 3, 0].set(1.0)  # only reachable through the bottom-right window
  y = m.apply(p, x)
  assert y.shape == (1, 2, 2, 1)
  # window (1,1) covers rows/cols 2..4 (4 is the pad): it sees x[3,3]; the others do not.
  np.testing.assert_allclose(np.asarray(y[0, :, :, 0]), [[1, 1], [1, 2]])


def test_quantizer_hand_computation():
  codebook = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  z = jnp.array([[0.9, 0.1], [0.1, 1.2], [-0.1, -0.1], [0.4, 0.0]])
  q = VectorQuantizer(3, 2)
  params = {'params': {'embedding': {'embedding': codebook}}}
  z_q, loss, idx = q.apply(params, z)
  np.testing.assert_array_equal(idx, [1, 2, 0, 0])
  np.testing.assert_allclose(z_q, codebook[np.array([1, 2, 0, 0])], atol=1e-7)
  mse = np.mean((np.asarray(codebook)[[1, 2, 0, 0]] - np.asarray(z)) ** 2)
  # legacy placement: commitment weight 1, codebook weight beta -> (1 + beta) * mse in value.
  np.testing.assert_allclose(loss, 1.25 * mse, rtol=1e-6)
  # expanded-form distances
  d = codebook_distances(z, codebook)
  np.testing.assert_allclose(d, ((z[:, None] - codebook[None]) ** 2).sum(-1), atol=1e-6)
  # indices round-trip through lookup
  np.testing.assert_allclose(q.apply(params, idx, method='lookup'), z_q, atol=1e-7)


def test_beta_placement_gradients():
  """Legacy: dL/dz = 2(z - z_q)/N (weight 1), dL/de = 2 beta (e - z)/N; fixed: swapped."""
  z = jnp.array([[0.5, -0.5]])
  e = jnp.array([[0.0, 0.0]])
  n = z.size
  for legacy, wz, we in ((True, 1.0, 0.25), (False, 0.25, 1.0)):
    gz, ge = jax.grad(lambda z, e: vq_loss(z, e, 0.25, legacy), argnums=(0, 1))(z, e)
    np.testing.assert_allclose(gz, wz * 2 * (z - e) / n, rtol=1e-6)
    np.testing.assert_allclose(ge, we * 2 * (e - z) / n, rtol=1e-6)


def test_straight_through_gradient_is_identity():
  q = VectorQuantizer(8, 4)
  z = jax.random.normal(jax.random.key(0), (5, 4))
  params = q.init(jax.random.key(1), z)
  w = jax.random.normal(jax.random.key(2), (5, 4))
  g = jax.grad(lambda z: jnp.sum(q.apply(params, z)[0] * w))(z)
  np.testing.assert_allclose(g, w, atol=1e-6)
  # and no gradient reaches the codebook through z_q
  ge = jax.grad(lambda p: jnp.sum(q.apply(p, z)[0] * w))(params)
  assert float(jnp.abs(ge['params']['embedding']['embedding']).max()) == 0.0


def test_argmin_takes_first_index_on_ties():
  codebook = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  q = VectorQuantizer(3, 2)
  _, _, idx = q.apply({'params': {'embedding': {'embedding': codebook}}}, jnp.array([[1.0, 0.0]]))
  assert int(idx[0]) == 0


# Small enough to compile fast: f2, no attention levels, 16x16 images.
GUMBEL = dict(
  ch=32,
  ch_mult=(1, 2),
  num_res_blocks=1,
  attn_resolutions=(),
  resolution=16,
  z_channels=16,
  n_embed=32,
  embed_dim=16,
  quantizer='gumbel',
  kl_weight=1e-3,
)


def test_gumbel_vqgan_names_eval_and_train_modes():
  model = VQGAN(**GUMBEL)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  # Random params of init's shapes (init itself runs the model eagerly: slow on CPU).
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  rng = np.random.default_rng(0)

  def leaf(path, s):
    name = path[-1].key
    if name == 'scale':
      return np.ones(s.shape, np.float32)
    fan_in = int(np.prod(s.shape[:-1])) if name == 'kernel' else 1
    return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32) * (
      0.1 if name == 'bias' else 1.0
    )

  params = jax.tree_util.tree_map_with_path(leaf, abstract)
  names = {'/'.join(k): v.shape for k, v in flatten_dict(params['quantize']).items()}
  assert names == {'proj/kernel': (16, 32), 'proj/bias': (32,), 'embed/embedding': (32, 16)}

  def pieces(m, x):
    h = m.quant_conv(m.encoder(x))
    return m.quantize.logits(h), m.encode(x), m(x)

  def train(p, k):
    return model.apply({'params': p}, x, train=True, rngs={'gumbel': k}, method='encode')

  def grads(p, train):
    def loss(p):
      xr, _, _ = model.apply({'params': p}, x, train=train, rngs={'gumbel': jax.random.key(3)})
      return jnp.mean(xr**2)

    return jax.grad(loss)(p)

  @jax.jit
  def everything(p):
    return (
      model.apply({'params': p}, x, method=pieces),
      [train(p, jax.random.key(k)) for k in (5, 5, 6)],
      grads(p, True),
      grads(p, False),
      model.apply({'params': p}, jnp.zeros((2, 8, 8), jnp.int32) + 3, method='decode_indices'),
    )

  (logits, (z_q, kl, idx), (xrec, _, idx2)), (a, b, c), g_train, g_eval, dec3 = everything(params)
  # Inference: argmax of the logits, no noise; z_q is the codebook row.
  np.testing.assert_array_equal(idx, jnp.argmax(logits, -1))
  np.testing.assert_array_equal(idx2, idx)
  emb = params['quantize']['embed']['embedding']
  np.testing.assert_array_equal(z_q, emb[idx])
  np.testing.assert_allclose(kl, gumbel_kl_loss(logits, 1e-3), rtol=1e-6)
  # decode_indices looks codes up in `embed`: code 3 everywhere decodes like z_q = embed[3].
  dec_ref = jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode'))(
    params, jnp.broadcast_to(emb[3], (2, 8, 8, 16))
  )
  np.testing.assert_allclose(dec3, dec_ref, atol=1e-5)
  # Training forward: noise from the 'gumbel' rng (reproducible), hard one-hot forward, and
  # the KL term is the noise-free one.
  np.testing.assert_array_equal(a[2], b[2])
  assert not np.array_equal(a[2], c[2])
  np.testing.assert_array_equal(a[0], emb[a[2]])
  np.testing.assert_allclose(a[1], kl, rtol=1e-6)
  with pytest.raises(Exception, match='gumbel'):
    jax.eval_shape(lambda p: model.apply({'params': p}, x, train=True, method='encode'), params)
  # Straight-through: the reconstruction's gradient reaches proj and the encoder in training
  # mode only (at inference z_q = embed[argmax] carries no gradient to them).
  for g, want in ((g_train, True), (g_eval, False)):
    for tree in (g['quantize']['proj'], g['encoder']):
      assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(tree)) == want


def test_gumbel_softmax_hard_and_soft():
  logits = jnp.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
  noise = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  soft, idx = gumbel_softmax(logits, noise, 0.5, hard=False)
  np.testing.assert_allclose(soft, jax.nn.softmax((logits + noise) / 0.5, -1), rtol=1e-6)
  np.testing.assert_array_equal(idx, [0, 2])  # the noise moved the first row's argmax
  hard, _ = gumbel_softmax(logits, noise, 0.5)
  np.testing.assert_allclose(hard, jax.nn.one_hot(idx, 3), atol=1e-7)
  # Straight-through: the gradient is the soft one's.
  w = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
  g_hard = jax.grad(lambda l: jnp.sum(gumbel_softmax(l, noise, 0.5)[0] * w))(logits)
  g_soft = jax.grad(lambda l: jnp.sum(gumbel_softmax(l, noise, 0.5, False)[0] * w))(logits)
  np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6)
  # KL to uniform: 0 for uniform logits, log K for a one-hot distribution (x kl_weight).
  np.testing.assert_allclose(gumbel_kl_loss(jnp.zeros((4, 8)), 2.0), 0.0, atol=1e-6)
  np.testing.assert_allclose(
    gumbel_kl_loss(jnp.array([[100.0, 0, 0, 0]]), 1.0), np.log(4), rtol=1e-6
  )
  assert GumbelQuantizer(4, 2).kl_weight == 1e-8  # GumbelVQ's default


@pytest.mark.parametrize('n_layers,size,out', [(3, 256, 30), (2, 256, 62), (2, 32, 6)])
def test_discriminator_shapes_and_names(n_layers, size, out):
  d = NLayerDiscriminator(ndf=8, n_layers=n_layers)
  x = jnp.zeros((2, size, size, 3))
  v = d.init(jax.random.key(0), x, train=True)
  logits, upd = d.apply(v, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (2, out, out, 1)
  convs = sorted(int(k.split('_')[1]) for k in v['params'] if 'kernel' in v['params'][k])
  norms = sorted(int(k.split('_')[1]) for k in v['batch_stats'])
  expected = {3: ([0, 2, 5, 8, 11], [3, 6, 9]), 2: ([0, 2, 5, 8], [3, 6])}[n_layers]
  assert (convs, norms) == expected
  # BatchNorm convs have no bias; first and last do.
  assert 'bias' in v['params']['main_0'] and 'bias' not in v['params']['main_2']


def test_batchnorm_matches_torch_semantics():
  """Running stats: momentum 0.1 and the unbiased variance; train mode uses batch stats."""
  from vqgan_jax.models.discriminator import TorchBatchNorm

  bn = TorchBatchNorm()
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 3 + 1
  v = bn.init(jax.random.key(1), x, train=True)
  v = {'params': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}, 'batch_stats': v['batch_stats']}
  y, upd = bn.apply(v, x, train=True, mutable=['batch_stats'])
  xn = np.asarray(x).reshape(-1, 2)
  np.testing.assert_allclose(
    np.asarray(y).reshape(-1, 2), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5), atol=1e-5
  )
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)


def test_groupnorm_matches_flax_groupnorm():
  import flax.linen as nn

  from vqgan_jax.models.layers import GroupNorm

  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 7, 64))
  ours, ref = GroupNorm(), nn.GroupNorm(num_groups=32, epsilon=1e-6)
  p = {
    'params': {
      'scale': jax.random.normal(jax.random.key(1), (64,)),
      'bias': jax.random.normal(jax.random.key(2), (64,)),
    }
  }
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(p)
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=2e-5)
