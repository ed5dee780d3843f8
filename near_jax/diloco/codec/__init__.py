"""The pseudo-gradient codec: what islands send and in-mesh replicas simulate.

spec         CompressionSpec, format names, top-k counts: no near_jax imports (config uses it)
compress     formats (fp32/bf16/int8/int4/fp4), top-k, error feedback; encode/decode in numpy
payload      the validated, self-describing wire format
fake_quant   the same codec in jax.numpy, bit-exact with numpy, for in-mesh replicas
"""
