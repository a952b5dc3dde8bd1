"""docs/configuration.md's key table is generated from config.KEYS and checked here.

The key, default, env and flag columns come from the KEYS table; the meaning column is
prose kept in the document (a new key starts with its KEYS doc string). After adding or
changing a key, `python tests/test_docs.py` rewrites the table in place; the test fails
until the document matches what that would write.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from echoserver.config import KEYS, format_value  # noqa: E402
from tests.servers import run_once  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"
HEADER = "| key | default | env | flag | meaning |\n|---|---|---|---|---|\n"
ROW = re.compile(r"^\| `([^`]+)` \|.*?\| (?P<meaning>[^|]*(?:\\\|[^|]*)*) \|$")


def _meanings(table: str) -> dict[str, str]:
    """The meaning column of each row already in the document, by key name."""
    found = {}
    for line in table.splitlines():
        match = ROW.match(line)
        if match:
            found[match.group(1)] = match.group("meaning")
    return found


def render(document: str) -> str:
    """The document with its key table regenerated from KEYS."""
    head, begin, rest = document.partition(BEGIN)
    table, end, tail = rest.partition(END)
    assert begin and end, f"{DOC} lost its {BEGIN} / {END} markers"
    meanings = _meanings(table)
    rows = []
    for key in KEYS:
        default = format_value(key.default).replace("|", "\\|")
        meaning = meanings.get(key.name) or key.doc.replace("|", "\\|")
        rows.append(f"| `{key.name}` | `{default}` | `{key.env}` | `{key.flag}` | {meaning} |\n")
    return head + BEGIN + "\n" + HEADER + "".join(rows) + END + tail


def test_the_key_table_is_what_the_keys_say() -> None:
    document = DOC.read_text(encoding="utf-8")
    assert document == render(document), (
        "docs/configuration.md's key table differs from config.KEYS: run "
        "`python tests/test_docs.py` to regenerate it, then review the meaning column"
    )


def test_the_table_names_every_key_print_config_prints() -> None:
    printed = run_once(
        "--print-config", env={"PATH": "/usr/bin:/bin"}, inherit=False, check=True
    ).stdout
    section = ""
    names = []
    for line in printed.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            field = line.split("=", 1)[0].strip()
            names.append(f"{section}.{field}" if section else field)
    table = DOC.read_text(encoding="utf-8").partition(BEGIN)[2].partition(END)[0]
    assert names and set(names) == set(_meanings(table))


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the key table in {DOC.relative_to(ROOT)}")
