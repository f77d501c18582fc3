"""Operations: Prometheus metrics (``metrics``), the health/metrics HTTP server (``health``), JSON logs
(``logs``), the bridge that mirrors metrics into Ray's metrics system (``ray_export``) and the startup checks
(``preflight``)."""
