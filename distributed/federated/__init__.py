"""Federated simulation: algorithms and the local loop (pure torch), partitions (pure plans), the
client-state store, the Ray actor pool and the server that drives rounds (`curvtrain federate`)."""
