"""Shared test support: what more than one test folder uses, in one place.

- ``network_guard``: the pytest plugin that fails any test reaching beyond 127.0.0.0/8 and ::1;
- ``engines``: the tiny checkpoints and the session's engines on them (pytest plugin);
- ``ray_cluster``, ``multinode``: the session's Ray instance and the multi-node cluster (pytest plugins);
  ``ray_drain``: run the stream on Ray actors until an event count is committed;
- ``kafka_io``: build, produce and read event streams against the embedded broker; run pipelines in threads;
- ``accounting``: the reliability tests' worker subprocesses and their offset accounting;
- ``contracts``, ``metrics``: schema validation of outputs, reading Prometheus figures;
- ``fake_engine`` (rule-based engine, dict cache), ``local_broker``, ``local_stream``: the in-memory stand-ins the
  moderation flow's and the stream's logic tests run on, beside the integration tests.
"""
