"""Parsing roster files: defaults, wildcards, Excel's quirks, and every error with its line."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from allocate.model import ANY, Window
from allocate.roster import (
    COLUMNS,
    DEFAULT_CAPACITY,
    DEFAULT_DAILY_CAP,
    DEFAULT_TIMEZONE,
    MAX_ERRORS_SHOWN,
    AgentRow,
    RosterInvalid,
    decode_csv,
    parse_agents_csv,
)

HEADER = ",".join(COLUMNS)
EXAMPLE = Path(__file__).parents[2] / "deploy" / "agents.example.csv"


def parse(text: str, **kwargs: str) -> list[AgentRow]:
    return parse_agents_csv(text, source="agents.csv", **kwargs)


def errors_of(text: str) -> list[str]:
    with pytest.raises(RosterInvalid) as raised:
        parse(text)
    assert "nothing imported" in str(raised.value)
    return raised.value.errors


def test_a_full_row() -> None:
    (row,) = parse(
        f"{HEADER}\n"
        "a-01,王芳,car-1,car_loan|financial_leasing,test_drive|ad_click,zh|en,8,120,1.5,"
        "Europe/London,22:00-06:00,available\n"
    )
    assert row == AgentRow(
        id="a-01",
        name="王芳",
        team="car-1",
        business_lines=("car_loan", "financial_leasing"),
        segments=("test_drive", "ad_click"),
        languages=("zh", "en"),
        capacity=8,
        daily_cap=120,
        weight=1.5,
        timezone="Europe/London",
        shift=Window(time(22), time(6)),
        status="available",
        line=2,
    )


def test_only_id_name_and_business_lines_are_required_and_the_rest_defaults() -> None:
    (row,) = parse("id,name,business_lines\na-01,李雷,*\n")
    assert row.business_lines == (ANY,)
    assert row.segments == (ANY,)  # no segments: every segment of the agent's lines
    assert row.languages == ()  # every language
    assert (row.capacity, row.daily_cap, row.weight) == (DEFAULT_CAPACITY, DEFAULT_DAILY_CAP, 1.0)
    assert row.timezone == DEFAULT_TIMEZONE == "Asia/Shanghai"
    assert row.shift is None
    assert row.team is None
    assert row.status is None  # not given: offline if new, unchanged if known


def test_empty_cells_take_the_defaults_too() -> None:
    (row,) = parse(f"{HEADER}\na-01,李雷,,car_loan,,,,,,,,\n")
    assert (row.team, row.segments, row.capacity, row.timezone, row.shift, row.status) == (
        None,
        (ANY,),
        DEFAULT_CAPACITY,
        DEFAULT_TIMEZONE,
        None,
        None,
    )


def test_the_default_timezone_can_be_given() -> None:
    (row,) = parse("id,name,business_lines\na-01,Li,*\n", default_timezone="Asia/Tokyo")
    assert row.timezone == "Asia/Tokyo"


def test_excel_utf8_with_bom_crlf_quotes_spaces_and_upper_case_header() -> None:
    text = (
        "\ufeffID, Name ,Business_Lines,Status\r\n"
        '"a-01","张伟, 组长", car_loan | wealth_management| ,AVAILABLE\r\n'
        "\r\n"
        ",,,\r\n"  # an emptied spreadsheet row
        "a-02,Zhang,*,away\r\n"
    )
    first, second = parse(text)
    assert (first.name, first.business_lines, first.status) == (
        "张伟, 组长",
        ("car_loan", "wealth_management"),
        "available",
    )
    assert (second.id, second.line) == ("a-02", 5)


def test_decode_accepts_utf8_and_explains_gbk() -> None:
    text = "id,name,business_lines\na-01,王芳,*\n"
    assert decode_csv(("\ufeff" + text).encode(), source="a.csv").endswith(text)
    with pytest.raises(RosterInvalid, match=r'a\.csv:2: not UTF-8 text .*"CSV UTF-8"'):
        decode_csv(text.encode("gbk"), source="a.csv")


def test_duplicate_items_in_a_list_collapse() -> None:
    (row,) = parse("id,name,business_lines,languages\na-01,Li,car_loan|car_loan,zh|zh|en\n")
    assert (row.business_lines, row.languages) == (("car_loan",), ("zh", "en"))


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        ("a 01,Li,*,,,,,,,,,", "agents.csv:2: id: 'a 01' is not an id"),
        (",Li,*,,,,,,,,,", "agents.csv:2: id: required"),
        ("a-01,,*,,,,,,,,,", "agents.csv:2: name: required"),
        ("a-01,Li,,,,,,,,,,", "agents.csv:2: business_lines: required"),
        ("a-01,Li,Car-Loan,,,,,,,,,", "agents.csv:2: business_lines: 'Car-Loan' is not a name"),
        ("a-01,Li,*|car_loan,,,,,,,,,", "agents.csv:2: business_lines: * already means every"),
        ("a-01,Li,*,hot segment,,,,,,,,", "agents.csv:2: segments: 'hot segment' is not a name"),
        ("a-01,Li,*,,chinese!,,,,,,,", "agents.csv:2: languages: 'chinese!' is not a language"),
        ("a-01,Li,*,,,ten,,,,,,", "agents.csv:2: capacity: 'ten' is not a whole number"),
        ("a-01,Li,*,,,0,,,,,,", "agents.csv:2: capacity: 0 is not between 1 and 1000"),
        ("a-01,Li,*,,,,2.5,,,,,", "agents.csv:2: daily_cap: '2.5' is not a whole number"),
        ("a-01,Li,*,,,,100000,,,,,", "agents.csv:2: daily_cap: 100000 is not between 1 and"),
        ("a-01,Li,*,,,,,heavy,,,,", "agents.csv:2: weight: 'heavy' is not a number"),
        ("a-01,Li,*,,,,,0,,,,", "agents.csv:2: weight: 0 is not a number greater than 0"),
        ("a-01,Li,*,,,,,nan,,,,", "agents.csv:2: weight: nan is not a number greater than 0"),
        ("a-01,Li,*,,,,,,Mars/Olympus,,,", "agents.csv:2: timezone: 'Mars/Olympus' is not an"),
        ("a-01,Li,*,,,,,,,9-18,,", "agents.csv:2: shift: '9-18' is not a window"),
        ("a-01,Li,*,,,,,,,09:00-09:00,,", "agents.csv:2: shift: '09:00-09:00' is an empty"),
        ("a-01,Li,*,,,,,,,,busy,", "agents.csv:2: status: 'busy' is not one of available"),
        ("a-01,Li,*,,,,,,,,", "agents.csv:2: 11 fields, but the header has 12"),
        ("a-01,Li,*,,,,,,,,,,", "agents.csv:2: 13 fields, but the header has 12"),
    ],
)
def test_each_bad_value_is_reported_with_file_line_and_column(cells: str, expected: str) -> None:
    header = "id,name,business_lines,segments,languages,capacity,daily_cap,weight,timezone,shift,status,team"
    errors = errors_of(f"{header}\n{cells}\n")
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_every_error_of_every_row_is_collected_and_nothing_is_returned() -> None:
    text = (
        "id,name,business_lines,capacity\n"
        "a-01,Li,car_loan,5\n"  # fine, but the file as a whole is refused
        "a-02,,car_loan,-1\n"
        "a-03,Han,car_loan,3\n"
        "a-01,Li again,car_loan,0\n"  # a duplicate is reported with the row's other errors
    )
    assert errors_of(text) == [
        "agents.csv:3: name: required",
        "agents.csv:3: capacity: -1 is not between 1 and 1000",
        "agents.csv:5: capacity: 0 is not between 1 and 1000",
        "agents.csv:5: id: 'a-01' is already on line 2",
    ]


def test_lines_count_from_the_file_even_with_a_quoted_newline() -> None:
    text = 'id,name,business_lines\na-01,"Li\nLei",*\na-02,,*\n'
    assert errors_of(text) == ["agents.csv:4: name: required"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "id,name,business_lines,skill,phone",
            "agents.csv:1: unknown columns 'skill', 'phone'; the columns are id, name, team",
        ),
        ("id,name", "agents.csv:1: missing required column business_lines"),
        ("id,business_lines,id,name", "agents.csv:1: column id given more than once"),
    ],
)
def test_header_errors(header: str, expected: str) -> None:
    (error,) = errors_of(f"{header}\na-01,Li,*\n")
    assert error.startswith(expected), error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "agents.csv: the file is empty"),
        ("\n\n", "agents.csv: the file is empty"),
        ("id,name,business_lines\n", "agents.csv: no agents"),
        ('id,name,business_lines\na-01,"Li,*\na-02,Han,*\n', "agents.csv:2: not readable as CSV"),
        ('id,name,business_lines\na-01,"Li"Lei,*\n', "agents.csv:2: not readable as CSV"),
    ],
)
def test_empty_or_unreadable_files(text: str, expected: str) -> None:
    (error,) = errors_of(text)
    assert error.startswith(expected), error


def test_a_long_error_list_is_cut_in_the_message_but_kept_whole() -> None:
    text = "id,name,business_lines\n" + "".join(f"a-{i},,*\n" for i in range(50))
    with pytest.raises(RosterInvalid) as raised:
        parse(text)
    assert len(raised.value.errors) == 50
    message = str(raised.value).splitlines()
    assert message[0] == "agents.csv: 50 errors, nothing imported:"
    assert len(message) == 1 + MAX_ERRORS_SHOWN + 1
    assert message[-1] == f"  ... and {50 - MAX_ERRORS_SHOWN} more"


def test_the_shipped_example_roster_parses() -> None:
    rows = parse_agents_csv(decode_csv(EXAMPLE.read_bytes(), source="x"), source=str(EXAMPLE))
    assert len(rows) >= 25
    lines = {line for row in rows for line in row.business_lines}
    assert {
        "enterprise_loan",
        "personal_credit_loan",
        "car_loan",
        "financial_leasing",
        "wealth_management",
    } <= lines
    assert any(row.shift and row.shift.end < row.shift.start for row in rows)  # wraps midnight
    assert any(ANY in row.business_lines or ANY in row.segments for row in rows)
    assert len({row.status for row in rows}) > 1
