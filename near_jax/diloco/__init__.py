"""Low-communication training across islands that share only storage (the DiLoCo family).

codec/      the pseudo-gradient codec: formats, wire payloads, the bit-exact jnp twin
outer       the outer step in jax (SGD with Nesterov momentum on averaged pseudo-gradients)
robust      aggregation rules a decision may name: mean, trimmed mean, coordinate median, top-G
store       the object store islands exchange through (file://, gs://, s3://), bounded reads
protocol/   the protocol: keys, versions, contributions, decisions, the numpy outer step
claims      island name claims; quarantine: planted decisions and `latest` set aside
island      an island's loop (`python -m near_jax.diloco.island`)
aggregator  the aggregator's loop (`python -m near_jax.diloco.aggregator`)

In-mesh DiLoCo (replicas on a `replica` mesh axis of one program) is a train step:
`near_jax.train.inmesh`, built on `codec/` and `outer`.
"""
