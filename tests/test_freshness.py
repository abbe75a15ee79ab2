"""When a cached firmware may be reused without asking the origin (core.freshness): the rules,
the Cache-Control parser and the stored record, including hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tedge_firmware.core.freshness import (
    CachedUrl,
    Freshness,
    Reuse,
    Revalidate,
    decide,
    parse_cache_control,
    parse_cached_url,
)

SHA = "ab" * 32


def record(cache_control: str | None = None, confirmed_at: float = 1000.0, **extra: object) -> CachedUrl:
    fields: dict[str, object] = {"etag": '"v1"', "last_modified": "Mon, 07 Dec 2026 00:00:00 GMT"} | extra
    return CachedUrl("https://origin/fw.bin", SHA, 10, cache_control=cache_control, confirmed_at=confirmed_at, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Freshness()),
        ("max-age=60", Freshness(max_age=60)),
        ("public, max-age=31536000, immutable", Freshness(max_age=31536000, immutable=True)),
        ("s-maxage=5, max-age=100", Freshness(max_age=5)),  # we are a shared cache
        ('max-age="30"', Freshness(max_age=30)),
        ("MAX-AGE=7", Freshness(max_age=7)),
        ("no-cache", Freshness(no_cache=True)),
        ("no-store, max-age=60", Freshness(max_age=60, no_cache=True)),
        ('no-cache="Set-Cookie", max-age=10', Freshness(max_age=10, no_cache=True)),
        ("max-age=abc", Freshness()),
        ("max-age=-1", Freshness()),
        ("max-age=1.5", Freshness()),
        ("max-age=1, max-age=2", Freshness()),  # conflicting: trusted neither
        ("max-age=" + "9" * 30, Freshness()),
        (",,, ;;", Freshness()),
        ("x" * 10_000, Freshness()),
    ],
)
def test_cache_control(value: str | None, expected: Freshness) -> None:
    assert parse_cache_control(value) == expected


@given(st.text(max_size=300))
def test_any_cache_control_header_is_understood_or_ignored(value: str) -> None:
    freshness = parse_cache_control(value)
    assert freshness.max_age is None or freshness.max_age >= 0


@pytest.mark.parametrize(
    ("cache_control", "now", "revalidate_after", "reused"),
    [
        ("immutable", 10**9, 0, True),  # no request, however old
        ("max-age=60", 1059, 0, True),
        ("max-age=60", 1060, 0, False),
        ("max-age=60, immutable, no-cache", 1001, 0, False),  # no-cache wins
        (None, 1001, 0, False),  # no freshness from the origin: every operation asks
        (None, 1029, 30, True),  # the site reuses a recent answer
        (None, 1030, 30, False),
        ("no-cache", 1001, 30, False),  # ... but not when the origin says no
        ("immutable", 999, 0, False),  # the clock went back: stale
        ("max-age=60", 999, 30, False),
    ],
)
def test_reuse_or_ask(cache_control: str | None, now: float, revalidate_after: float, reused: bool) -> None:
    decision = decide(record(cache_control), now, revalidate_after)
    assert isinstance(decision, Reuse) is reused, decision


def test_asking_sends_the_validators_it_has() -> None:
    decision = decide(record(), 2000)
    assert isinstance(decision, Revalidate)
    assert decision.headers == {"If-None-Match": '"v1"', "If-Modified-Since": "Mon, 07 Dec 2026 00:00:00 GMT"}
    bare = decide(record(etag=None, last_modified=None), 2000)
    assert isinstance(bare, Revalidate) and bare.headers == {}  # a plain GET


def test_a_304_confirms_and_keeps_what_it_does_not_repeat() -> None:
    confirmed = record("max-age=60").confirmed(5000, etag=None, last_modified=None, cache_control="max-age=600")
    assert (confirmed.confirmed_at, confirmed.etag, confirmed.cache_control) == (5000, '"v1"', "max-age=600")
    assert confirmed.sha256 == SHA and confirmed.size == 10


def test_the_record_round_trips() -> None:
    for value in (record("immutable"), CachedUrl(None, SHA, 0)):
        assert parse_cached_url(value.to_json()) == value


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        json.dumps({"sha256": "AB" * 32, "size": 1, "confirmed_at": 1}).encode(),  # upper case
        json.dumps({"sha256": SHA, "size": -1, "confirmed_at": 1}).encode(),
        json.dumps({"sha256": SHA, "size": True, "confirmed_at": 1}).encode(),
        json.dumps({"sha256": SHA, "size": 1, "confirmed_at": "1"}).encode(),
        b'{"sha256": "' + SHA.encode() + b'", "size": 1, "confirmed_at": NaN}',
        json.dumps({"sha256": SHA, "size": 1, "confirmed_at": 1, "url": 5}).encode(),
        json.dumps({"sha256": SHA, "size": 1, "confirmed_at": 1, "etag": "x" * 5000}).encode(),
        b"[" * 100_000,
        b" " * (70 * 1024),
    ],
)
def test_a_damaged_record_is_no_record(data: bytes) -> None:
    assert parse_cached_url(data) is None


@given(st.binary(max_size=500))
def test_any_bytes_are_a_record_or_none(data: bytes) -> None:
    parsed = parse_cached_url(data)
    assert parsed is None or parse_cached_url(parsed.to_json()) == parsed


@given(
    st.builds(
        CachedUrl,
        url=st.none() | st.text(max_size=100),
        sha256=st.just(SHA),
        size=st.integers(min_value=0, max_value=2**40),
        etag=st.none() | st.text(max_size=50),
        last_modified=st.none() | st.text(max_size=50),
        cache_control=st.none() | st.text(max_size=50),
        confirmed_at=st.floats(min_value=0, max_value=2e9),
    )
)
def test_every_record_round_trips(value: CachedUrl) -> None:
    assert parse_cached_url(value.to_json()) == value
