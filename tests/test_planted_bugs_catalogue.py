"""The planted-bug catalogue (tests/planted_bugs.py) cannot rot silently: every entry's OLD snippet still occurs
exactly once in its file, its bug differs from it, and every test it names exists. No bug is planted here; the
catalogue is run with ``python tests/planted_bugs.py``."""
import re

import pytest

from tests.helpers import ROOT
from tests.planted_bugs import CATALOGUE, KINDS


def test_entries_have_distinct_ids_and_known_kinds():
    ids = [b.id for b in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert {b.kind for b in CATALOGUE} <= set(KINDS)
    assert all(b.tests and b.description for b in CATALOGUE)


@pytest.mark.parametrize("entry", CATALOGUE, ids=[b.id for b in CATALOGUE])
def test_each_bug_still_applies_to_the_code_and_names_existing_tests(entry):
    text = (ROOT / entry.file).read_text()
    assert text.count(entry.old) == 1, f"{entry.file}: OLD occurs {text.count(entry.old)} times; update the entry"
    assert entry.new != entry.old
    for test in entry.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        if name:
            assert re.search(rf"^\s*def {re.escape(name.split('[')[0])}\(", (ROOT / path).read_text(), re.M), test
