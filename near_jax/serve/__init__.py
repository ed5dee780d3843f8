"""Serving a trained run: the OpenAI-compatible server, continuous batching, metering, signed
replies, attestation and payouts (`python -m near_jax.serve`; the README's "Serving" section).

    engine       continuous batching: slots over one KV cache, chunked prefill, one decode
                 step for every busy slot (runs in its own thread)
    wire         request bodies parsed and checked (one-line 400s naming the field), replies
    text         tokens to text as they arrive: held-back partial characters, stop strings
    chat         the plain chat template
    inflight     a request's sequences, from the engine thread to the event loop
    app          the HTTP routes (Starlette): generation, metering, signatures, report
    metrics      Prometheus metrics
    keys         API keys (hashed at rest), prices and limits
    usage        the hash-chained SQLite usage ledger
    metering     authorization, worst-case holds, settling into the ledger
    attestation  signed exchanges, nonce-bound reports, receipts, params and code hashes
    payout       a period's revenue split among the run's contributors, signed
"""
