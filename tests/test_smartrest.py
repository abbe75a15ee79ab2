"""SmartREST codec, from tables: every line of the reference plus CSV edge cases."""

from __future__ import annotations

import pytest

from tedge_firmware.core import smartrest
from tedge_firmware.core.smartrest import FirmwareRequest
from tedge_firmware.errors import SmartRestError

U = "http://test.domain.com"


@pytest.mark.parametrize(
    ("payload", "records"),
    [
        ("515,child,fw,1.0,U", ["515,child,fw,1.0,U"]),
        ("515,a,b,c,d\n", ["515,a,b,c,d"]),
        ("511,x,foo\n515,c,n,v,U\n515,d,n,v,U", ["511,x,foo", "515,c,n,v,U", "515,d,n,v,U"]),
        ('515,c,"multi\nline",v,U\n106,a', ['515,c,"multi\nline",v,U', "106,a"]),
        ("515,c,n,v,U\r\n515,d,n,v,U\r\n", ["515,c,n,v,U", "515,d,n,v,U"]),
        ('515,c,fw \\"x\\",1,U', ['515,c,fw "x",1,U']),
        ('515,c,\\"a\nb,1,U', ['515,c,"a', "b,1,U"]),
        ("515,c,a\\b,1,U", ["515,c,a\\b,1,U"]),
        ("\n\n", []),
        ("", []),
    ],
)
def test_split_records(payload: str, records: list[str]) -> None:
    assert smartrest.split_records(payload) == records


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("515,child-device,fw-name,fw-version," + U, FirmwareRequest("child-device", "fw-name", "fw-version", U)),
        ('515,child-device,"fw, x",1.0,U,extra', FirmwareRequest("child-device", "fw, x", "1.0", "U")),
        ('515,c,"say ""hi""",1,U', FirmwareRequest("c", 'say "hi"', "1", "U")),
        ("515,,,,", FirmwareRequest("", "", "", "")),
        ('515,c,"line1\nline2",1,U', FirmwareRequest("c", "line1\nline2", "1", "U")),
        ("515,c, spaced ,1,U", FirmwareRequest("c", " spaced ", "1", "U")),
    ],
)
def test_parse_firmware_request(record: str, expected: FirmwareRequest) -> None:
    assert smartrest.parse_firmware_request(record) == expected


@pytest.mark.parametrize(
    "record",
    ["515,child-device,fw-name,fw-version", "515", "515,a,b,c", "516,a,b,c,d", ""],
)
def test_parse_firmware_request_rejects_short_or_foreign(record: str) -> None:
    with pytest.raises(SmartRestError):
        smartrest.parse_firmware_request(record)


def test_crlf_url_is_the_same_as_lf_url() -> None:
    [crlf] = smartrest.split_records("515,c,n,v," + U + "\r\n")
    assert smartrest.parse_firmware_request(crlf).url == U


@pytest.mark.parametrize(
    ("record", "template"), [("515,a", "515"), ("106", "106"), ("71,tok", "71"), ("", "")]
)
def test_template_id(record: str, template: str) -> None:
    assert smartrest.template_id(record) == template


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (smartrest.get_pending_operations(), "500"),
        (smartrest.set_executing(), "501,c8y_Firmware\n"),
        (smartrest.set_successful(), "503,c8y_Firmware,\n"),
        (smartrest.set_failed("Failed due to permission."), '502,c8y_Firmware,"Failed due to permission."\n'),
        (smartrest.set_failed(""), '502,c8y_Firmware,""\n'),
        (smartrest.set_failed("a, b, c"), '502,c8y_Firmware,"a, b, c"\n'),
        (smartrest.set_failed('bad "quote"'), '502,c8y_Firmware,"bad ""quote"""\n'),
        (smartrest.set_failed("two\r\nlines\there"), '502,c8y_Firmware,"two lines here"\n'),
        (smartrest.set_installed_firmware("fw-name", "fw-version", U), "115,fw-name,fw-version," + U),
        (smartrest.set_installed_firmware("fw, x", '1"0', "u\nv"), '115,"fw, x","1""0","u\nv"'),
        (smartrest.register_child("child1"), "101,child1,child1,thin-edge.io-child"),
        (smartrest.supported_operations(["c8y_Restart", "c8y_Firmware"]), "114,c8y_Firmware,c8y_Restart\n"),
    ],
)
def test_golden_output_lines(line: str, expected: str) -> None:
    assert line == expected


def test_reason_is_bounded() -> None:
    line = smartrest.set_failed("x" * 10_000)
    assert len(line) < smartrest.MAX_REASON_LENGTH + 30
    assert line.endswith('…"\n')


def test_quoted_output_round_trips_through_the_parser() -> None:
    line = smartrest.set_installed_firmware('n,"q"', "v\nw", "u")
    assert smartrest.parse_fields(line) == ["115", 'n,"q"', "v\nw", "u"]


@pytest.mark.parametrize(
    ("record", "token"), [("71,abc.def.ghi", "abc.def.ghi"), ('71,"tok"', "tok")]
)
def test_parse_jwt_response(record: str, token: str) -> None:
    assert smartrest.parse_jwt_response(record) == token


@pytest.mark.parametrize("record", ["71", "71,", "70,tok", "71,a,b", "garbage", ""])
def test_parse_jwt_response_rejects_malformed(record: str) -> None:
    with pytest.raises(SmartRestError):
        smartrest.parse_jwt_response(record)


def test_parse_child_list() -> None:
    assert smartrest.parse_child_list("106,a,b,,c") == ["a", "b", "c"]
    assert smartrest.parse_child_list("106") == []
    with pytest.raises(SmartRestError):
        smartrest.parse_child_list("107,a")
