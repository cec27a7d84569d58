"""docs/cli/<command>.txt is each command's full --help, generated from the settings models by
`make docs` (nas.cli.write_help_pages): this test fails when a flag, default or help text changed
and the page was not regenerated."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nas.cli import COMMANDS, help_pages

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli"

# argparse's layout differs between Python versions; the pages are written with CI's Python.
pytestmark = pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="pages are generated with Python 3.11"
)


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return help_pages()


def test_one_page_per_command(pages):
    assert set(pages) == {"nas", *COMMANDS}
    assert sorted(p.stem for p in DOCS.glob("*.txt")) == sorted(pages)


@pytest.mark.parametrize("name", ["nas", *COMMANDS])
def test_page_is_current(pages, name):
    path = DOCS / f"{name}.txt"
    assert path.is_file(), f"{path} missing: run `make docs`"
    assert path.read_text() == pages[name], f"{path} is stale: run `make docs`"


def test_pages_show_every_flag(pages):
    # a flag the model adds appears on its command's page (here: --dry-run, on every command)
    assert all("--dry-run" in pages[name] for name in COMMANDS)
