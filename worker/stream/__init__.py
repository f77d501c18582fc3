"""The Kafka side of the worker: clients, micro-batching, offsets and the stream pipeline."""
