"""VerdictCache against a real Redis: MGET/SET EX round trip, TTL, and riding out an outage."""

import redis

from worker.cache.redis_cache import SET_MANY_CHUNK, VerdictCache
from worker.ops import metrics


def cache_errors() -> float:
    return metrics.CACHE_REQUESTS.labels(result="error")._value.get()


def recorded_mgets(cache: VerdictCache) -> list[list[str]]:
    """The keys of every MGET ``cache`` sends from now on, one list per call (the call still goes to Redis)."""
    fetched: list[list[str]] = []
    real_mget = cache._client.mget

    def mget(keys):
        fetched.append(list(keys))
        return real_mget(keys)

    cache._client.mget = mget
    return fetched


def test_set_many_then_get_many_round_trips_with_ttl(services, make_settings):
    settings = make_settings()
    settings.redis.ttl_seconds = 120
    settings.redis.key_prefix = "mw:test-roundtrip:"
    cache = VerdictCache(settings.redis)
    try:
        assert cache.available
        value = {"unsafe": True, "score": 0.93, "codes": ["S9"], "dropped": []}
        cache.set_many([("k1", value), ("k2", {"unsafe": False, "score": 0.01, "codes": [], "dropped": []})])
        assert cache.get_many(["k1", "missing", "k2"]) == [
            value,
            None,
            {"unsafe": False, "score": 0.01, "codes": [], "dropped": []},
        ]
        ttl = redis.Redis.from_url(services.redis_url).ttl("mw:test-roundtrip:k1")
        assert 0 < ttl <= 120
    finally:
        cache.close()


def test_equal_entries_are_parsed_once_and_shared_across_reads(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-shared:"
    cache = VerdictCache(settings.redis)
    try:
        entry = {"unsafe": False, "score": 0.1, "codes": [], "dropped": []}
        cache.set_many([("a", entry), ("b", entry), ("c", {**entry, "score": 0.2})])
        a, b, c, a_again = cache.get_many(["a", "b", "c", "a"])
        assert a == b == a_again == entry and c == {**entry, "score": 0.2}
        assert a is b is a_again and c is not a, "one dict per distinct entry"
        assert cache.get_many(["a"])[0] is a, "shared across reads too"
        cache.set_many([("a", {**entry, "score": 0.3})])
        changed = cache.get_many(["a"])[0]
        assert changed == {**entry, "score": 0.3} and changed is not a, "a changed entry is parsed afresh"
    finally:
        cache.close()


def test_a_key_repeated_in_one_read_is_fetched_once_and_counted_per_request(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-repeats:"
    cache = VerdictCache(settings.redis)
    fetched = recorded_mgets(cache)
    hits, misses = (metrics.CACHE_REQUESTS.labels(result=r)._value.get() for r in ("hit", "miss"))
    try:
        a_entry, b_entry = ({"unsafe": u, "score": 0.5, "codes": [], "dropped": []} for u in (True, False))
        cache.set_many([("a", a_entry), ("b", b_entry)])
        values = cache.get_many(["a", "b", "a", "missing", "a"])
        assert values == [a_entry, b_entry, a_entry, None, a_entry]
        assert values[0] is values[2] is values[4]
        assert fetched == [["mw:test-repeats:a", "mw:test-repeats:b", "mw:test-repeats:missing"]]
        assert metrics.CACHE_REQUESTS.labels(result="hit")._value.get() - hits == 4
        assert metrics.CACHE_REQUESTS.labels(result="miss")._value.get() - misses == 1
    finally:
        cache.close()


def test_set_raw_stores_more_keys_than_one_script_call_takes_each_with_its_ttl(services, make_settings):
    settings = make_settings()
    cache = VerdictCache(settings.redis)
    keys = [f"{settings.redis.key_prefix}raw:{i}" for i in range(2 * SET_MANY_CHUNK + 7)]
    try:
        cache.set_raw([(key, b"%d" % i) for i, key in enumerate(keys)], 60)
        assert cache.get_raw(keys) == [b"%d" % i for i in range(len(keys))]
        client = redis.Redis.from_url(services.redis_url)
        assert {0 < client.ttl(key) <= 60 for key in (keys[0], keys[SET_MANY_CHUNK], keys[-1])} == {True}
    finally:
        cache.close()


def test_a_corrupt_entry_is_a_miss(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-corrupt:"
    redis.Redis.from_url(services.redis_url).set("mw:test-corrupt:bad", b"\xff not json")
    cache = VerdictCache(settings.redis)
    try:
        assert cache.get_many(["bad"]) == [None]
    finally:
        cache.close()


def test_disabled_cache_never_connects_and_always_misses(make_settings):
    settings = make_settings()
    settings.redis.enabled = False
    settings.redis.url = "redis://127.0.0.1:1/0"
    cache = VerdictCache(settings.redis)
    assert not cache.available
    assert cache.get_many(["a", "b"]) == [None, None]
    cache.set_many([("a", {"unsafe": False})])  # no error


def test_outage_is_counted_logged_once_and_recovers(services, make_settings, caplog):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-outage:"
    settings.redis.reconnect_interval_s = 0.2
    settings.redis.socket_timeout_s = 0.5
    now = [0.0]
    cache = VerdictCache(settings.redis, clock=lambda: now[0])
    try:
        assert cache.available and metrics.REDIS_UP._value.get() == 1
        services.stop_redis()
        errors_before = cache_errors()
        with caplog.at_level("WARNING", logger="worker.cache.redis_cache"):
            assert cache.get_many(["a", "b"]) == [None, None]
            cache.set_many([("a", {"unsafe": False})])
            now[0] += 0.1  # within the reconnect interval: no new attempt
            assert cache.get_many(["c"]) == [None]
            now[0] += 1.0  # attempt again: still down
            assert cache.get_many(["d"]) == [None]
        assert not cache.available
        assert metrics.REDIS_UP._value.get() == 0
        assert cache_errors() - errors_before == 4
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
        services.start_redis()
        now[0] += 1.0
        cache.set_many([("back", {"unsafe": True, "score": 1.0, "codes": [], "dropped": []})])
        assert cache.available and metrics.REDIS_UP._value.get() == 1
        assert cache.get_many(["back"]) == [{"unsafe": True, "score": 1.0, "codes": [], "dropped": []}]
    finally:
        if services.redis_pid is None:
            services.start_redis()
        cache.close()


def test_near_cache_answers_repeats_without_a_round_trip_until_it_expires(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-near:"
    settings.redis.near_cache_s = 1.0
    now = [100.0]
    cache = VerdictCache(settings.redis, clock=lambda: now[0])
    fetched = recorded_mgets(cache)
    other = redis.Redis.from_url(services.redis_url)
    hits = metrics.CACHE_REQUESTS.labels(result="hit")._value.get()
    try:
        entry = {"unsafe": True, "score": 0.9, "codes": ["S1"], "dropped": []}
        cache.set_many([("a", entry)])
        assert cache.get_many(["a", "missing"]) == [entry, None]
        assert fetched == [["mw:test-near:a", "mw:test-near:missing"]]
        # Another writer changes the entry and stores the missing one: the hit is answered from the near copy,
        # the miss is read again (misses are never kept).
        other.set("mw:test-near:a", b'{"unsafe": false, "score": 0.1, "codes": [], "dropped": []}')
        other.set("mw:test-near:missing", b'{"unsafe": false, "score": 0.2, "codes": [], "dropped": []}')
        now[0] += 0.9
        assert cache.get_many(["a", "missing", "a"]) == [
            entry,
            {"unsafe": False, "score": 0.2, "codes": [], "dropped": []},
            entry,
        ]
        assert fetched[1:] == [["mw:test-near:missing"]]
        assert cache.get_many(["a"]) == [entry] and len(fetched) == 2, "all held near: no round trip"
        assert metrics.CACHE_REQUESTS.labels(result="hit")._value.get() - hits == 5
        now[0] += 0.2  # past near_cache_s since the read: Redis is asked again, and the change is seen
        assert cache.get_many(["a"]) == [{"unsafe": False, "score": 0.1, "codes": [], "dropped": []}]
        assert fetched[2:] == [["mw:test-near:a"]]
    finally:
        cache.close()
        other.close()


def test_a_verdict_stored_here_replaces_its_near_copy(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-near-store:"
    cache = VerdictCache(settings.redis, clock=lambda: 0.0)
    try:
        cache.set_many([("a", {"unsafe": False, "score": 0.1, "codes": [], "dropped": []})])
        assert cache.get_many(["a"])[0]["score"] == 0.1
        cache.set_many([("a", {"unsafe": True, "score": 0.8, "codes": ["S2"], "dropped": []})])
        assert cache.get_many(["a"])[0]["score"] == 0.8
    finally:
        cache.close()


def test_near_cache_off_reads_redis_every_time(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-near-off:"
    settings.redis.near_cache_s = 0.0
    cache = VerdictCache(settings.redis, clock=lambda: 0.0)
    calls = recorded_mgets(cache)
    try:
        cache.set_many([("a", {"unsafe": False, "score": 0.1, "codes": [], "dropped": []})])
        for _ in range(3):
            assert cache.get_many(["a"])[0] is not None
        assert len(calls) == 3
    finally:
        cache.close()


def test_near_copies_answer_through_an_outage_and_the_rest_count_as_errors(services, make_settings):
    settings = make_settings()
    settings.redis.key_prefix = "mw:test-near-outage:"
    settings.redis.reconnect_interval_s = 60.0
    now = [0.0]
    cache = VerdictCache(settings.redis, clock=lambda: now[0])
    try:
        entry = {"unsafe": False, "score": 0.1, "codes": [], "dropped": []}
        cache.set_many([("a", entry)])
        assert cache.get_many(["a"]) == [entry]
        services.stop_redis()
        errors = cache_errors()
        now[0] += 0.5
        assert cache.get_many(["a", "b", "b"]) == [entry, None, None]
        assert cache_errors() - errors == 2, "the two lookups Redis could not answer"
        now[0] += 1.0  # the near copy expired: a miss while Redis is down
        assert cache.get_many(["a"]) == [None]
    finally:
        if services.redis_pid is None:
            services.start_redis()
        cache.close()
