"""docs/security.md maps each way in and each threat to the tests that prove it, named `file.py::test_name`:
each named test is defined in the file it is named with."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).parent
DOC = ROOT / "docs/security.md"


def defined_tests(path: Path) -> set[str]:
    """The test functions (module level or methods) a test file defines."""
    return set(re.findall(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(test_\w+)", path.read_text(), re.M))


def test_every_test_the_security_document_names_is_in_the_file_it_names():
    text = DOC.read_text()
    pairs = set(re.findall(r"\b(test_\w+\.py)::(test_\w+)\b", text))
    assert pairs, "docs/security.md names no test as file::test"
    wrong = []
    for file, name in sorted(pairs):
        path = TESTS / file
        if not path.is_file():
            wrong.append(f"{file}::{name} (no such file)")
        elif name not in defined_tests(path):
            where = sorted(p.name for p in TESTS.glob("test_*.py") if name in defined_tests(p))
            wrong.append(f"{file}::{name} (defined in {', '.join(where) or 'no test file'})")
    assert not wrong, "wrong references in docs/security.md:\n" + "\n".join(wrong)


def test_the_security_document_names_every_test_with_its_file():
    """A bare `test_name` (or a `file.py` alone) could not be checked against its file: every mention is a pair."""
    text = DOC.read_text()
    paired = re.sub(r"\btest_\w+\.py::test_\w+\b", "", text)
    assert not sorted(set(re.findall(r"\btest_\w+", paired)))
