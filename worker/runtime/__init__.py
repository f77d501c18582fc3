"""Ray runtime: GuardWorker actors pinned to GPUs (the stream) and the Ray Serve HTTP endpoint.

The pipeline and the engine are plain Python; this package only places them on a Ray cluster,
restarts them when they die and serves the engine over HTTP. ``ray`` is imported lazily, after
``worker.runtime.ray_env.local_ray_env`` has set the environment it reads at import time.
"""
