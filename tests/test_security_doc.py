"""docs/security.md maps each way in and each threat to the tests that prove it: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_security_document_names_exists():
    named = set(re.findall(r"\btest_\w+", (ROOT / "docs/security.md").read_text()))
    tests = Path(__file__).parent
    defined = {p.stem for p in tests.glob("test_*.py")}
    for path in tests.glob("*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    assert named and not sorted(named - defined)
