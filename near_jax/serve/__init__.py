"""Serving a trained run: OpenAI-compatible API, continuous batching, metering, signed
responses, attestation, payouts."""
