"""The verdict cache: content-derived keys (``keys``) and the Redis store (``redis_cache``)."""
