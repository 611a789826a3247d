"""Transports: what carries the round engine's messages. `inprocess` (every client a node in this
process: the embedded default, experiments, tests) and `flower` (Flower's Message API: SuperLink
and SuperNodes over gRPC, or its simulation engine). Both start a run through
`privlora.federation.startup.start_run` and drive the same `RoundEngine`."""
