"""Mixed-precision dots: same-dtype (bf16) operands, float32 accumulation and result, and
backward passes that stay in the operands' dtype."""

import functools

import jax
import jax.numpy as jnp


# Matmuls in a low-precision compute dtype (bf16) take bf16 operands and accumulate and return
# float32: on CPU these are the fast dots (bf16 outputs are not), and on accelerators the
# standard mixed precision. Plain autodiff of such a dot would run the backward in float32 (the
# float32 cotangent promotes the bf16 operand), at float32 speed; `mixed_einsum` keeps both
# backward dots in the compute dtype, accumulating in float32, as the forward does.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a, b):
  """`einsum(spec, a, b)` of same-dtype operands, accumulated and returned in float32.

  spec is 'lhs,rhs->out' where every index of an operand appears in the other operand or in
  the output (true of Dense and attention dots): its gradients are then the einsums
  'out,rhs->lhs' and 'lhs,out->rhs', run in the operands' dtype with float32 accumulation.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec, a, b):
  return mixed_einsum(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec, res, g):
  a, b = res
  ins, out = spec.split('->')
  sa, sb = ins.split(',')
  g = g.astype(a.dtype)
  da = jnp.einsum(f'{out},{sb}->{sa}', g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f'{sa},{out}->{sb}', a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)
