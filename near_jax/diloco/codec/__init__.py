"""The pseudo-gradient codec: what islands send and in-mesh replicas simulate.

spec         CompressionSpec, format names, top-k counts: no near_jax imports (config uses it)
topk         top-k selection (per leaf or per chunk) and index coding in numpy
payload      the validated, self-describing wire format
compress     formats (fp32/bf16/int8/int4/fp4/int2), top-k, error feedback; encode/decode in numpy
fake_quant   the same codec in jax.numpy, bit-exact with numpy, for in-mesh replicas
"""
