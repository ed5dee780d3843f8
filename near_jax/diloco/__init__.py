"""Low-communication training across islands that share only storage (the DiLoCo family).

codec/      the pseudo-gradient codec: formats, wire payloads, the bit-exact jnp twin
outer       the outer step in jax (SGD with Nesterov momentum on averaged pseudo-gradients)
robust      aggregation rules a decision may name: mean, trimmed mean, coordinate median, top-G
store       the object store islands exchange through (file://, gs://, s3://), bounded reads
slowlink    a store behind a simulated slow link (bandwidth, latency): the programs' --link
protocol/   the protocol: keys, versions, contributions, decisions, the numpy outer step
claims      island name claims; quarantine: planted decisions and `latest` set aside
startup     what both programs check first: common flags, config, store, run; UsageError
assignment  assigned data: a contributor's batches of round r from (run, r, its key)
island/     an island's loop (`python -m near_jax.diloco.island`)
aggregator/ the Aggregator and its loop (`python -m near_jax.diloco.aggregator`)

The library takes arguments and raises; the two `__main__` programs read the flags, exit,
and pass in what `near_jax.contrib` provides for contributor runs (contrib's validator-built
Aggregator; the island's signer and slot check): only those programs import contrib.

In-mesh DiLoCo (replicas on a `replica` mesh axis of one program) is a train step:
`near_jax.train.inmesh`, built on `codec/` and `outer`.
"""
