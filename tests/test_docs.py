"""The README cannot drift from the code: its config reference lists every RunConfig key with its
real default and flag, every strategy has a section, and the worked example's screenshot exists."""

from __future__ import annotations

import dataclasses
import os
import re

import yaml

from scoring.config import RunConfig
from scoring.strategies import names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def config_table() -> list[list[str]]:
    text = readme()
    start = text.index("<!-- config-reference")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("key", "---"):
            continue
        rows.append(cells)
    return rows


def unquote(cell: str) -> str:
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, f"expected a `code` cell, got {cell!r}"
    return m.group(1)


def run_flags() -> dict[str, str]:
    """config key -> the `protoprune run` flag that sets it."""
    from ray_jobs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))
    run = sub.choices["run"]
    return {a.dest: a.option_strings[0] for a in run._actions if a.option_strings}


def test_config_reference_lists_every_key_in_order():
    keys = [unquote(r[0]) for r in config_table()]
    assert keys == [f.name for f in dataclasses.fields(RunConfig)]


def test_config_reference_defaults_match_the_dataclass():
    rows = {unquote(r[0]): r for r in config_table()}
    for f in dataclasses.fields(RunConfig):
        cell = rows[f.name][2]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert cell == "(required)", f.name
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert yaml.safe_load(unquote(cell)) == default, f"{f.name}: README says {cell}"
        assert rows[f.name][3], f"{f.name}: no meaning given"


def test_config_reference_flags_match_the_cli():
    flags = run_flags()
    for row in config_table():
        key, flag = unquote(row[0]), row[1]
        if key in flags:
            assert unquote(flag) == flags[key], key
        else:
            assert flag == "(YAML only)", f"{key}: README names flag {flag}, the CLI has none"


def test_a_section_per_strategy():
    text = readme()
    for s in names():
        assert re.search(rf"^#### `{s}`$", text, re.M), f"no README section for strategy {s}"
    assert "Sorscher et al. 2022" in text
    assert "keep\nhard examples when data is abundant" in text or (
        "hard examples when data is abundant" in text.replace("\n", " ")
    )


def test_worked_example_and_screenshot():
    text = readme()
    for cmd in (
        "protoprune demo demo-data",
        "protoprune run --input demo-data",
        "protoprune report demo-runs/demo",
    ):
        assert cmd in text
    assert "](docs/report.png)" in text
    path = os.path.join(ROOT, "docs", "report.png")
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 300_000
