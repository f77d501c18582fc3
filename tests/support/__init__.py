"""Shared test support: what more than one test folder uses, in one place.

- ``network_guard``: the pytest plugin that fails any test reaching beyond 127.0.0.0/8 and ::1;
- ``engines``: the tiny checkpoints and the session's engines on them (pytest plugin);
- ``ray_cluster``, ``multinode``: the session's Ray instance and the multi-node cluster (pytest plugins);
- ``kafka_io``: build, produce and read event streams against the embedded broker; run pipelines in threads;
- ``accounting``: the reliability tests' worker subprocesses and their offset accounting;
- ``local_broker``, ``memory_cache``, ``scripted_engine``, ``local_stream``: the in-memory broker, cache and
  engine the stream's logic tests run the real pipeline on.
"""
