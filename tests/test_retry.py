"""Table tests of the pure retry and resume policy (tedge_firmware.core.retry)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tedge_firmware.core.http import (
    RETRY_AFTER_CAP,
    declared_sha256,
    parse_amz_checksum,
    parse_content_length,
    parse_content_range,
    parse_instance_digest,
    parse_repr_digest,
    parse_retry_after,
    resume_validator,
)
from tedge_firmware.core.resume import (
    MAX_RESUME_RECORD_BYTES,
    RestartPlan,
    ResumeAction,
    ResumeState,
    decode_resume_state,
    encode_resume_state,
    plan_restart,
    resume_decision,
)
from tedge_firmware.core.retry import (
    RetryPolicy,
    describe_status,
    format_seconds,
    is_transient_status,
    plan_retry,
)
from tedge_firmware.core.text import one_line

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ETAG = '"18c1a2b3-100"'
LAST_MODIFIED = "Wed, 01 May 2024 11:00:00 GMT"


# RetryPolicy.delay --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (6, 60.0), (7, 60.0), (100, 60.0), (10**6, 60.0)],
)
def test_delay_grows_exponentially_up_to_the_cap(attempt: int, expected: float) -> None:
    policy = RetryPolicy(initial=1.0, multiplier=2.0, max_interval=60.0, jitter=0.0)
    assert policy.delay(attempt) == expected


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 1000])
def test_jitter_stays_within_its_fraction_and_varies(attempt: int) -> None:
    policy = RetryPolicy(initial=0.5, multiplier=3.0, max_interval=20.0, jitter=0.25)
    base = min(0.5 * 3.0**attempt, 20.0) if attempt < 100 else 20.0
    rng = random.Random(attempt)
    delays = [policy.delay(attempt, rng) for _ in range(500)]
    assert all(base * 0.75 <= delay <= base * 1.25 for delay in delays)
    assert max(delays) - min(delays) > base * 0.3  # spread over the band, not a constant


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    assert policy.delay(3, random.Random(7)) == policy.delay(3, random.Random(7))


def test_delay_without_rng_uses_module_random() -> None:
    policy = RetryPolicy(initial=2.0, jitter=0.1)
    assert 1.8 <= policy.delay(0) <= 2.2


def test_delay_rejects_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().delay(-1)


@pytest.mark.parametrize(
    "fields",
    [
        {"initial": -1.0},
        {"initial": 5.0, "max_interval": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"max_elapsed": -1.0},
        {"initial": float("nan")},
        {"max_interval": float("inf")},
        {"max_total": 0.0},
        {"max_total": -1.0},
        {"max_total": float("inf")},
        {"max_total": float("nan")},
    ],
)
def test_policy_rejects_unusable_values(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**fields)


# plan_retry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "elapsed", "retry_after", "expected"),
    [
        (1, 0.0, None, 1.0),  # first failure: the initial interval
        (3, 3.0, None, 4.0),
        (3, 6.5, None, None),  # 6.5 + 4 > 10: out of budget
        (1, 0.0, 5.0, 5.0),  # Retry-After longer than our schedule wins
        (4, 0.0, 2.0, 8.0),  # but never makes us retry sooner than our schedule
        (1, 0.0, 10.5, None),  # a Retry-After past the budget: give up now
        (1, 9.0, None, 1.0),  # exactly at the budget is still allowed
    ],
)
def test_plan_retry_waits_within_the_budget(
    failures: int, elapsed: float, retry_after: float | None, expected: float | None
) -> None:
    policy = RetryPolicy(initial=1.0, multiplier=2.0, max_interval=60.0, max_elapsed=10.0, jitter=0)
    assert plan_retry(policy, failures=failures, elapsed=elapsed, retry_after=retry_after) == (
        expected
    )


@pytest.mark.parametrize(
    ("failures", "elapsed", "total_elapsed", "expected"),
    [
        (1, 0.0, 0.0, 1.0),
        (1, 0.0, 28.0, 1.0),  # ends at 29 s: inside the 30 s cap
        (1, 0.0, 29.5, None),  # would end past the cap, although progress restarted max_elapsed
        (1, 0.0, 29.0, 1.0),  # exactly at the cap is still allowed
        (4, 0.0, 20.0, 8.0),
        (4, 0.0, 23.0, None),
    ],
)
def test_plan_retry_respects_the_hard_cap(
    failures: int, elapsed: float, total_elapsed: float, expected: float | None
) -> None:
    policy = RetryPolicy(initial=1.0, max_interval=60.0, max_elapsed=10.0, jitter=0, max_total=30.0)
    assert (
        plan_retry(policy, failures=failures, elapsed=elapsed, total_elapsed=total_elapsed)
        == expected
    )


def test_without_a_cap_only_progress_bounds_retrying() -> None:
    policy = RetryPolicy(initial=1.0, max_elapsed=10.0, jitter=0)
    assert policy.max_total is None
    assert plan_retry(policy, failures=1, elapsed=0.0, total_elapsed=10**9) == 1.0


# is_transient_status / describe_status ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (599, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (410, False),
        (416, False),
        (200, False),
        (206, False),
        (301, False),
        (600, False),
        (999, False),
        (0, False),
        (-500, False),
    ],
)
def test_transient_statuses(status: int, transient: bool) -> None:
    assert is_transient_status(status) is transient


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (404, "Not Found", "HTTP 404 Not Found"),
        (404, "whatever the server says", "HTTP 404 Not Found"),
        (503, None, "HTTP 503 Service Unavailable"),
        (599, "Network Connect Timeout", "HTTP 599 Network Connect Timeout"),
        (599, "evil\r\n502,c8y_Firmware,\x00x", "HTTP 599 evil 502,c8y_Firmware, x"),
        (599, "", "HTTP 599"),
        (599, "x" * 500, "HTTP 599 " + "x" * 59 + "\u2026"),
    ],
)
def test_describe_status(status: int, reason: str | None, expected: str) -> None:
    assert describe_status(status, reason) == expected


# parse_retry_after --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        (" 120 ", 120.0),
        ("Wed, 01 May 2024 12:00:30 GMT", 30.0),
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past: retry now
        ("Wednesday, 01-May-24 12:01:00 GMT", 60.0),  # obsolete RFC 850 form
        ("Wed May  1 12:00:05 2024", 5.0),  # asctime form (naive: taken as UTC)
        ("Wed, 01 May 2024 14:00:30 +0200", None),  # an HTTP-date is always GMT
        ("Wed, 01 May 2024 12:00:30 -0000", None),
        ("Wed, 1 May 2024 12:00:30 GMT", None),  # IMF-fixdate has two-digit days
        ("9999999999", 9999999999.0),
        ("99999999999", float(RETRY_AFTER_CAP)),  # capped
        ("9" * 150, float(RETRY_AFTER_CAP)),  # capped without int() of the digit string
        ("9" * 5000, None),  # longer than any header we read
        (None, None),
        ("", None),
        ("   ", None),
        ("-1", None),
        ("1.5", None),
        ("1e3", None),
        ("+5", None),
        ("0x10", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits are digits to str.isdigit, not to HTTP
        ("soon", None),
        ("Wed, 32 May 2024 12:00:00 GMT", None),
        ("Wed, 01 Foo 2024 12:00:00 GMT", None),
        ("Wed, 01 May 0000 12:00:00 GMT", None),
        ("Wed, 01 May 2024 25:00:00 GMT", None),
        ("Wed, 01 May 2024 12:00:00 GMT" + "x" * 300, None),
        ("Wed, 01 May 2024 12:00:00 GMT\x00", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_far_future_date_is_capped() -> None:
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW) == float(RETRY_AFTER_CAP)


def test_parse_retry_after_accepts_a_naive_now_as_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert parse_retry_after("Wed, 01 May 2024 12:00:10 GMT", naive) == 10.0


def test_parse_retry_after_with_a_non_utc_now() -> None:
    now = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert parse_retry_after("Wed, 01 May 2024 12:00:10 GMT", now) == 10.0


# parse_content_range / parse_content_length -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-499/1234", (0, 499, 1234)),
        ("bytes 500-1233/1234", (500, 1233, 1234)),
        ("bytes 0-0/1", (0, 0, 1)),
        ("bytes 42-99/*", (42, 99, None)),
        ("BYTES 1-2/3", (1, 2, 3)),
        ("  bytes 1-2/3  ", (1, 2, 3)),
        ("bytes\t1-2/3", (1, 2, 3)),
        ("bytes 0-9999999999999999998/9999999999999999999", (0, 9999999999999999998, 10**19 - 1)),
        (None, None),
        ("", None),
        ("bytes */1234", None),  # unsatisfied range: names no bytes
        ("bytes 5-3/10", None),  # end before start
        ("bytes 0-10/10", None),  # end past the last byte
        ("bytes 0-10/0", None),
        ("bytes -1-10/20", None),
        ("bytes 1-/20", None),
        ("bytes 1-2", None),
        ("bytes=1-2/3", None),
        ("items 1-2/3", None),
        ("bytes 1-2/3, 5-6/7", None),
        ("bytes 1 - 2/3", None),
        ("bytes 0x1-2/3", None),
        ("bytes \u0661-2/3", None),
        ("bytes 1-2/3\r\nX-Evil: 1", None),
        ("bytes 0-1/" + "9" * 20, None),  # more digits than any real file size
        ("bytes " + "1" * 300 + "-2/3", None),
    ],
)
def test_parse_content_range(
    value: str | None, expected: tuple[int, int, int | None] | None
) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("2048", 2048),
        (" 7 ", 7),
        (None, None),
        ("", None),
        ("-1", None),
        ("1.0", None),
        ("12, 12", None),
        ("9" * 20, None),
        ("\u0661", None),
    ],
)
def test_parse_content_length(value: str | None, expected: int | None) -> None:
    assert parse_content_length(value) == expected


# resume_validator ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"ETag": ETAG, "Last-Modified": LAST_MODIFIED}, ETAG),
        ({"etag": ETAG}, ETAG),
        ({"ETag": 'W/"weak"', "Last-Modified": LAST_MODIFIED}, LAST_MODIFIED),
        ({"ETag": 'W/"weak"'}, None),
        ({"ETag": "unquoted"}, None),
        ({"ETag": '"has"quote"'}, None),
        ({"ETag": '"' + "a" * 300 + '"'}, None),
        ({"Last-Modified": LAST_MODIFIED}, LAST_MODIFIED),
        ({"Last-Modified": "yesterday"}, None),
        ({}, None),
    ],
)
def test_resume_validator(headers: dict[str, str], expected: str | None) -> None:
    assert resume_validator(headers) == expected


# resume_decision ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "offset", "validator", "action", "body_end", "total"),
    [
        # 200: whole file, whatever we asked for
        (200, {"Content-Length": "1000"}, 0, None, ResumeAction.RESTART, 1000, 1000),
        (200, {"Content-Length": "1000"}, 400, ETAG, ResumeAction.RESTART, 1000, 1000),
        (200, {}, 400, ETAG, ResumeAction.RESTART, None, None),
        (200, {"Content-Length": "-5"}, 0, None, ResumeAction.RESTART, None, None),
        # 206 matching our offset: continue
        (
            206,
            {"Content-Range": "bytes 400-999/1000"},
            400,
            ETAG,
            ResumeAction.CONTINUE,
            1000,
            1000,
        ),
        (
            206,
            {"content-range": "bytes 400-999/1000", "content-length": "600", "etag": ETAG},
            400,
            ETAG,
            ResumeAction.CONTINUE,
            1000,
            1000,
        ),
        (206, {"Content-Range": "bytes 400-499/*"}, 400, ETAG, ResumeAction.CONTINUE, 500, None),
        (206, {"Content-Range": "bytes 400-499/1000"}, 400, ETAG, ResumeAction.CONTINUE, 500, 1000),
        (
            206,
            {"Content-Range": "bytes 400-999/1000", "Last-Modified": LAST_MODIFIED},
            400,
            LAST_MODIFIED,
            ResumeAction.CONTINUE,
            1000,
            1000,
        ),
        # 206 we cannot use: refetch from zero
        (206, {"Content-Range": "bytes 0-999/1000"}, 400, ETAG, ResumeAction.REFETCH, None, None),
        (206, {"Content-Range": "bytes 500-999/1000"}, 400, ETAG, ResumeAction.REFETCH, None, None),
        (206, {}, 400, ETAG, ResumeAction.REFETCH, None, None),
        (206, {"Content-Range": "garbage"}, 400, ETAG, ResumeAction.REFETCH, None, None),
        (206, {"Content-Range": "bytes */1000"}, 400, ETAG, ResumeAction.REFETCH, None, None),
        (
            206,
            {"Content-Range": "bytes 400-999/1000", "ETag": '"other"'},
            400,
            ETAG,
            ResumeAction.REFETCH,
            None,
            None,
        ),
        (
            206,
            {"Content-Range": "bytes 400-999/1000", "Last-Modified": "Thu, 02 May 2024 0:0:0 GMT"},
            400,
            LAST_MODIFIED,
            ResumeAction.REFETCH,
            None,
            None,
        ),
        (
            206,
            {"Content-Range": "bytes 400-999/1000", "Content-Length": "1000"},
            400,
            ETAG,
            ResumeAction.REFETCH,
            None,
            None,
        ),
        (416, {"Content-Range": "bytes */300"}, 400, ETAG, ResumeAction.REFETCH, None, None),
        # not a body: the caller classifies the status
        (416, {}, 0, None, ResumeAction.NOT_A_BODY, None, None),
        (404, {"Content-Length": "10"}, 0, None, ResumeAction.NOT_A_BODY, None, None),
        (503, {"Retry-After": "1"}, 400, ETAG, ResumeAction.NOT_A_BODY, None, None),
        (204, {}, 0, None, ResumeAction.NOT_A_BODY, None, None),
        (304, {}, 400, ETAG, ResumeAction.NOT_A_BODY, None, None),
    ],
)
def test_resume_decision(
    status: int,
    headers: dict[str, str],
    offset: int,
    validator: str | None,
    action: ResumeAction,
    body_end: int | None,
    total: int | None,
) -> None:
    decision = resume_decision(status, headers, offset, validator=validator)
    assert decision.action is action
    assert decision.body_end == body_end
    assert decision.total == total
    if action is ResumeAction.CONTINUE:
        assert decision.offset == offset
    if action is ResumeAction.REFETCH:
        assert decision.offset == 0
        assert decision.reason and "\n" not in decision.reason


@pytest.mark.parametrize(
    ("content_range", "expected_total", "action"),
    [
        ("bytes 400-999/1000", 1000, ResumeAction.CONTINUE),
        ("bytes 400-999/1000", None, ResumeAction.CONTINUE),
        ("bytes 400-499/*", 1000, ResumeAction.CONTINUE),  # no size named: nothing to compare
        ("bytes 400-1199/1200", 1000, ResumeAction.REFETCH),  # same ETag, other size: changed
    ],
)
def test_resume_decision_checks_the_announced_total(
    content_range: str, expected_total: int | None, action: ResumeAction
) -> None:
    headers = {"Content-Range": content_range, "ETag": ETAG}
    decision = resume_decision(206, headers, 400, validator=ETAG, expected_total=expected_total)
    assert decision.action is action
    if action is ResumeAction.REFETCH:
        assert decision.reason == "the file size changed on the server (1000 to 1200)"


def test_a_200_ignores_the_announced_total() -> None:
    decision = resume_decision(200, {"Content-Length": "5"}, 400, validator=ETAG, expected_total=9)
    assert (decision.action, decision.total) == (ResumeAction.RESTART, 5)


def test_resume_decision_names_the_unexpected_offset() -> None:
    decision = resume_decision(206, {"Content-Range": "bytes 0-9/10"}, 4)
    assert decision.reason == "HTTP 206 for bytes 0- instead of 4-"


def test_resume_decision_accepts_the_positional_signature() -> None:
    assert resume_decision(206, {"Content-Range": "bytes 4-9/10"}, 4).action is (
        ResumeAction.CONTINUE
    )


# small text helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("two\nlines\r\n", "two lines"),
        ("tab\tand   spaces", "tab and spaces"),
        ("nul\x00byte", "nul byte"),
        ("c1\x85control", "c1 control"),
        ("caf\u00e9", "caf\u00e9"),
        ("a" * 250, "a" * 199 + "\u2026"),
    ],
)
def test_one_line(text: str, expected: str) -> None:
    assert one_line(text, limit=200) == expected


def test_one_line_is_bounded_by_default() -> None:
    long = one_line("x" * 1000)
    assert len(long) == 500 and long.endswith("\u2026")


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (30.0, "30s"),
        (31.4, "31s"),
        (0.3, "0.3s"),
        (1.0, "1s"),
        (1.25, "1.2s"),
        (0.04, "0s"),
        (0.0, "0s"),
        (59.6, "1m"),
        (60.0, "1m"),
        (192.0, "3m12s"),
        (600.0, "10m"),
        (3600.0, "1h"),
        (3725.0, "1h2m5s"),
        (3605.0, "1h5s"),
        (90061.0, "25h1m1s"),
    ],
)
def test_format_seconds(seconds: float, expected: str) -> None:
    assert format_seconds(seconds) == expected


# declared digests ---------------------------------------------------------------------------

DATA = b"firmware image"
HEX = hashlib.sha256(DATA).hexdigest()
B64 = base64.b64encode(hashlib.sha256(DATA).digest()).decode()
OTHER_B64 = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
OTHER_HEX = hashlib.sha256(b"other").hexdigest()
SHA512_B64 = base64.b64encode(hashlib.sha512(DATA).digest()).decode()
URLSAFE_B64 = base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()  # has "-" and "_"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"sha-256=:{B64}:", HEX),
        (f"  sha-256=:{B64}:  ", HEX),
        (f"sha-512=:{SHA512_B64}:, sha-256=:{B64}:", HEX),
        (f"sha-256=:{B64}:;note=1", HEX),  # parameters do not change the value
        (f"sha-256=:{OTHER_B64}:, sha-256=:{B64}:", HEX),  # the last member wins
        (f"sha-512=:{SHA512_B64}:", None),  # another algorithm only
        (f"SHA-256=:{B64}:", None),  # structured-field keys are lowercase
        (f"sha-256={B64}", None),  # not a byte sequence
        (f"sha-256=:{B64}", None),
        (f"sha-256=:{B64[:-1]}:", None),  # not padded
        (f"sha-256=:{B64[:-2]}==:", None),  # 31 bytes
        (f"sha-256=:{SHA512_B64}:", None),  # a 64-byte value is not a SHA-256
        (f"sha-256=:{URLSAFE_B64}:", None),  # the URL-safe alphabet is not base64 here
        (f"sha-256=:{HEX}:", None),  # hex is not base64 of 32 bytes
        (f"sha-256=:{B64}:, sha-256=:garbage:", None),
        ("sha-256", None),  # a bare key (boolean true)
        ("sha-256=", None),
        ("sha-256=::", None),
        ("", None),
        (None, None),
        (f"sha-256=:{B64}:\r\nX-Evil: 1", None),
        (f"sha-256=:{B64}:" + ", x=1" * 300, None),  # longer than we read
        ("sha-256=:" + "A" * 5000 + ":", None),
        (f"sha-256=:{B64[:20]}\u00e9{B64[21:]}:", None),
    ],
)
def test_parse_repr_digest(value: str | None, expected: str | None) -> None:
    assert parse_repr_digest(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"SHA-256={B64}", HEX),
        (f"sha-256={B64}", HEX),
        (f"MD5=XrY7u+Ae7tCTyyK7j1rNww==, SHA-256={B64}", HEX),
        (f"SHA-256={B64},MD5=XrY7u+Ae7tCTyyK7j1rNww==", HEX),
        ("MD5=XrY7u+Ae7tCTyyK7j1rNww==", None),
        (f"SHA-256=:{B64}:", None),  # the RFC 9530 form is not the RFC 3230 one
        (f"SHA-256={HEX}", None),
        (f"SHA-256={B64[:-1]}", None),
        (f"SHA-256={B64}x", None),
        (f"SHA256={B64}", None),
        ("SHA-256=", None),
        (None, None),
        ("", None),
    ],
)
def test_parse_instance_digest(value: str | None, expected: str | None) -> None:
    assert parse_instance_digest(value) == expected


@pytest.mark.parametrize(
    ("value", "checksum_type", "expected"),
    [
        (B64, None, HEX),
        (f" {B64} ", None, HEX),
        (B64, "FULL_OBJECT", HEX),
        (B64, "COMPOSITE", None),  # a checksum of part checksums, not of the file
        (B64, "composite", None),
        (f"{B64}-3", None, None),  # the multipart form
        (HEX, None, None),
        ("", None, None),
        (None, None, None),
        (SHA512_B64, None, None),
    ],
)
def test_parse_amz_checksum(
    value: str | None, checksum_type: str | None, expected: str | None
) -> None:
    assert parse_amz_checksum(value, checksum_type) == expected


@pytest.mark.parametrize(
    ("headers", "partial", "expected"),
    [
        ({"Repr-Digest": f"sha-256=:{B64}:"}, False, HEX),
        ({"repr-digest": f"sha-256=:{B64}:"}, True, HEX),
        ({"Digest": f"SHA-256={B64}"}, True, HEX),
        ({"x-amz-checksum-sha256": B64}, False, HEX),
        ({"X-Amz-Checksum-Sha256": B64}, False, HEX),
        ({"x-amz-checksum-sha256": B64}, True, None),  # only defined for whole objects
        (
            {"x-amz-checksum-sha256": B64, "x-amz-checksum-type": "COMPOSITE"},
            False,
            None,
        ),
        # precedence: Repr-Digest, then Digest, then the S3 header
        ({"Repr-Digest": f"sha-256=:{B64}:", "Digest": f"SHA-256={OTHER_B64}"}, False, HEX),
        ({"Digest": f"SHA-256={B64}", "x-amz-checksum-sha256": OTHER_B64}, False, HEX),
        # an unusable first choice falls through to the next
        ({"Repr-Digest": "sha-256=:bad:", "Digest": f"SHA-256={OTHER_B64}"}, False, OTHER_HEX),
        ({"Content-Digest": f"sha-256=:{B64}:"}, False, None),  # of the message body only
        ({"ETag": f'"{HEX}"'}, False, None),
        ({}, False, None),
    ],
)
def test_declared_sha256(headers: dict[str, str], partial: bool, expected: str | None) -> None:
    assert declared_sha256(headers, partial=partial) == expected


# the resume record --------------------------------------------------------------------------

URL = "https://tenant.example.com/inventory/binaries/42"
STATE = ResumeState(URL, ETAG, 4_000_000, HEX)


@pytest.mark.parametrize(
    "state",
    [
        STATE,
        ResumeState(URL, LAST_MODIFIED, None, None),
        ResumeState(URL, None, None, None),
        ResumeState(URL, ETAG, 0, None),
        ResumeState('http://h/\u00e9?q=1&r="x"', ETAG, 10**19 - 1, HEX),
    ],
)
def test_resume_record_round_trips(state: ResumeState) -> None:
    raw = encode_resume_state(state)
    assert decode_resume_state(raw) == state
    assert len(raw) < 1024


def test_resume_record_names_the_validator_kind() -> None:
    assert json.loads(encode_resume_state(STATE))["validator_kind"] == "etag"
    lm = ResumeState(URL, LAST_MODIFIED)
    assert json.loads(encode_resume_state(lm))["validator_kind"] == "last-modified"
    assert json.loads(encode_resume_state(ResumeState(URL)))["validator_kind"] is None


def _record(**changes: object) -> bytes:
    record = json.loads(encode_resume_state(STATE))
    record.update(changes)
    return json.dumps(record).encode()


def _without(name: str) -> bytes:
    record = json.loads(encode_resume_state(STATE))
    del record[name]
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"a string"',
        b"\xff\xfe not utf-8",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser should go (and too big)
        b"[" * 30_000 + b"]" * 30_000,  # deep, within the size limit
        _record(version=2),
        _record(version=True),
        _record(version="1"),
        _record(url=""),
        _record(url=None),
        _record(url=7),
        _record(validator='"x"\r\nX-Evil: 1'),  # would inject a header
        _record(validator='W/"weak"'),
        _record(validator="yesterday"),
        _record(validator=" " + ETAG),
        _record(validator=42),
        _record(validator_kind="last-modified"),  # does not match the ETag
        _record(validator_kind=None),
        _record(validator=None),  # kind says etag
        _record(total=-1),
        _record(total=1.5),
        _record(total=True),
        _record(total="100"),
        _record(total=10**19),
        _record(sha256=HEX.upper()),
        _record(sha256=HEX[:-1]),
        _record(sha256=B64),
        _record(extra=1),  # unknown fields: not a record we wrote
        _without("total"),
        _without("version"),
        b" " * (MAX_RESUME_RECORD_BYTES + 1),
    ],
)
def test_a_corrupt_resume_record_is_refused(raw: bytes) -> None:
    assert decode_resume_state(raw) is None


def test_a_resume_record_with_spaces_is_still_read() -> None:
    assert decode_resume_state(b"  " + encode_resume_state(STATE) + b"\n") == STATE


# plan_restart -------------------------------------------------------------------------------

GOOD = encode_resume_state(STATE)


@pytest.mark.parametrize(
    ("raw", "part_size", "keep", "kept_state", "note"),
    [
        (None, None, 0, None, ""),  # nothing left: a fresh download
        (None, 0, 0, None, ""),
        (None, 1000, 0, None, "a partial file without its resume record"),
        (GOOD, None, 0, None, "a resume record without its partial file"),
        (b"{broken", 1000, 0, None, "an unreadable resume record"),
        (b"", 1000, 0, None, "an unreadable resume record"),
        (
            encode_resume_state(ResumeState(URL + "?v=2", ETAG)),
            1000,
            0,
            None,
            "a partial file of another url",
        ),
        (
            encode_resume_state(ResumeState(URL)),
            1000,
            0,
            None,
            "the server gave no ETag or Last-Modified to resume with",
        ),
        (GOOD, 0, 0, None, ""),  # nothing to keep
        (GOOD, 4_000_001, 0, None, "a partial file longer than the file (4000000 bytes)"),
        (GOOD, 4_000_000, 3_999_999, STATE, "the partial file is complete: recheck"),
        (GOOD, 1_048_576, 1_048_576, STATE, "resuming at byte 1048576"),
        (GOOD, 1, 1, STATE, "resuming at byte 1"),
        (
            encode_resume_state(ResumeState(URL, LAST_MODIFIED)),
            5,
            5,
            ResumeState(URL, LAST_MODIFIED),
            "resuming at byte 5",
        ),
    ],
)
def test_plan_restart(
    raw: bytes | None,
    part_size: int | None,
    keep: int,
    kept_state: ResumeState | None,
    note: str,
) -> None:
    assert plan_restart(raw, url=URL, part_size=part_size) == RestartPlan(keep, kept_state, note)


def test_plan_restart_compares_urls_exactly() -> None:
    for other in (URL.upper(), URL + "/", " " + URL, URL.replace("https", "http")):
        assert plan_restart(GOOD, url=other, part_size=10).keep == 0
