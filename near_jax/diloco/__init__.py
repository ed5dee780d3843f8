"""Low-communication training: DiLoCo in a mesh and across islands that share only storage.

outer       the outer step (SGD with Nesterov momentum on averaged pseudo-gradients)
inmesh      replicas on a `replica` mesh axis inside one program
compress    pseudo-gradient codec (fp32/bf16/int8/int4/fp4, top-k, error feedback)
payload     its validated, self-describing wire format
fake_quant  the same codec in jax.numpy, bit-exact, for in-mesh replicas
store, rounds, island, aggregator   islands exchanging payloads through an object store
"""
