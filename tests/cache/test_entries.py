"""The cache entry format: a model answer survives the round trip; a malformed entry is a miss."""

import orjson
import pytest

from worker.cache.entries import from_entry, to_entry
from worker.engine.types import GuardResult


def test_an_answer_survives_the_round_trip_through_json():
    result = GuardResult(score=0.93, unsafe=True, codes=("S1", "S9"), dropped_codes=("S14",), raw_output="x")
    back = from_entry(orjson.loads(orjson.dumps(to_entry(result))))
    assert back == GuardResult(score=0.93, unsafe=True, codes=("S1", "S9"), dropped_codes=("S14",))


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"unsafe": True, "codes": []},
        {"unsafe": True, "score": "high", "codes": []},
        {"unsafe": True, "score": 0.5, "codes": 3},
    ],
)
def test_a_malformed_entry_is_a_miss(value):
    assert from_entry(value) is None
