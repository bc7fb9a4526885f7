"""docs/bad_inputs.md is backed by tests: every row names a test that exists (and its case, where it names one),
and the catalogue keeps at least 60 cases."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad_inputs.md"
ROW = re.compile(r"^\| (?!input \||---)(.+) \| (.+) \| (test_\w+\.py)::(test_\w+)(?:\[([^\]]+)\])? \|$")


def rows():
    return [m.groups() for line in DOC.read_text().splitlines() if (m := ROW.match(line))]


def test_every_row_names_a_test_that_exists():
    table_rows = [ln for ln in DOC.read_text().splitlines() if ln.startswith("| ") and not ln.startswith(("| input", "|---"))]
    found = rows()
    assert len(found) == len(table_rows), [ln for ln in table_rows if not ROW.match(ln)]
    for _, _, file, name, case in found:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
        if case is not None:
            assert case in source, f"{file}::{name}[{case}]: no case {case!r} in {file}"


def test_the_catalogue_counts_at_least_60_cases_and_no_failure():
    found = rows()
    assert len(found) >= 60, len(found)
    for what, seen, *_ in found:
        assert not re.search(r"\bTraceback\b|\bhangs?\b", seen), (what, seen)
