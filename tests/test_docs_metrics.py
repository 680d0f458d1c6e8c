"""docs/metrics.md and the DuckDB comments cannot fall behind the schema.

Every table and view a warehouse has gets a section in docs/metrics.md listing exactly its
columns with their DuckDB types, every column has a comment in the warehouse, and that comment
is the doc's one-line meaning of the column. The CSV sections list exactly the exported columns.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli.main import build_parser
from warehouse.store import db
from warehouse.store.attention_export import ATTENTION_EXPORTS, export_file_name
from warehouse.store.export import EXPORTS

REPO = Path(__file__).resolve().parents[1]
METRICS_DOC = REPO / "docs" / "metrics.md"
SECTION_RE = re.compile(r"^### `([A-Za-z0-9_.]+)` \((table|view|csv|parquet)\)\s*$", re.M)


def doc_sections(text: str) -> dict[str, tuple[str, str]]:
    """{name: (kind, body)} of the `### `name` (table|view|csv)` sections."""
    marks = list(SECTION_RE.finditer(text))
    out = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        end = nxt.start() if nxt else len(text)
        end = min(end, text.find("\n## ", m.end()) if text.find("\n## ", m.end()) > 0 else end)
        assert m.group(1) not in out, f"two sections document {m.group(1)}"
        out[m.group(1)] = (m.group(2), text[m.end():end])
    return out


def column_rows(body: str) -> list[tuple[str, str, str, str]]:
    """(column, type, unit, meaning) of the rows `| `col` | TYPE | unit | meaning |` of a section."""
    rows = []
    for line in body.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"a column row needs 4 cells (no '|' inside a cell): {line}"
        rows.append((cells[0].strip("`"), cells[1], cells[2], cells[3]))
    return rows


def documented_columns(sections: dict, name: str) -> list[tuple[str, str, str, str]]:
    """The column rows of a table/view section; a view may say 'Same columns as `x`'."""
    kind, body = sections[name]
    same = re.search(r"Same columns as `([a-z_]+)`", body)
    if same:
        assert not column_rows(body), f"{name}: either a column table or 'Same columns as', not both"
        return documented_columns(sections, same.group(1))
    return column_rows(body)


@pytest.fixture(scope="module")
def warehouse_catalog(tmp_path_factory):
    """Tables, views and columns (with types and comments) of a freshly created warehouse."""
    path = tmp_path_factory.mktemp("docs") / "wh.duckdb"
    db.ensure_schema(path)
    with db.reader(path) as con:
        relations = con.execute(
            "SELECT table_name, 'table', comment FROM duckdb_tables() WHERE NOT internal "
            "UNION ALL SELECT view_name, 'view', comment FROM duckdb_views() WHERE NOT internal").fetchall()
        columns = con.execute(
            "SELECT table_name, column_name, data_type, comment FROM duckdb_columns() WHERE NOT internal "
            "ORDER BY table_name, column_index").fetchall()
    by_table: dict[str, list] = {}
    for table, column, data_type, comment in columns:
        by_table.setdefault(table, []).append((column, data_type, comment))
    return {name: (kind, comment) for name, kind, comment in relations}, by_table


def test_every_table_view_and_column_has_a_comment(warehouse_catalog):
    relations, columns = warehouse_catalog
    assert {"head_metrics", "runs", "token_attention", "head_samples", "latest_head_metrics",
            "layer_plasticity"} <= set(relations)
    missing = [name for name, (_, comment) in relations.items() if not (comment or "").strip()]
    assert not missing, f"no COMMENT ON TABLE/VIEW in sql/comments.sql for: {missing}"
    missing = [f"{t}.{c}" for t, cols in columns.items() for c, _, comment in cols if not (comment or "").strip()]
    assert not missing, f"no COMMENT ON COLUMN in sql/comments.sql for: {missing}"


def test_metrics_doc_lists_every_column_with_its_type_and_comment(warehouse_catalog):
    relations, columns = warehouse_catalog
    sections = doc_sections(METRICS_DOC.read_text())
    for name, (kind, _) in relations.items():
        assert name in sections, f"docs/metrics.md has no section '### `{name}` ({kind})'"
        assert sections[name][0] == kind, f"{name} is a {kind}, the doc says {sections[name][0]}"
        documented = documented_columns(sections, name)
        assert [r[0] for r in documented] == [c for c, _, _ in columns[name]], \
            f"docs/metrics.md: the columns of {name} differ from the warehouse's (order included)"
        for (col, doc_type, _, meaning), (_, data_type, comment) in zip(documented, columns[name]):
            assert doc_type == data_type, f"{name}.{col}: doc says {doc_type}, DuckDB has {data_type}"
            assert comment == meaning.replace("`", ""), \
                f"{name}.{col}: the comment in sql/comments.sql is not the doc's meaning:\n{comment}\n{meaning}"
    stale = [n for n, (kind, _) in sections.items() if kind not in ("csv", "parquet") and n not in relations]
    assert not stale, f"docs/metrics.md documents tables/views the warehouse does not have: {stale}"


def test_metrics_doc_lists_every_exported_csv_column():
    sections = doc_sections(METRICS_DOC.read_text())
    for table, (columns, _) in {**EXPORTS, **ATTENTION_EXPORTS}.items():
        written = [re.split(r"\s+AS\s+", c.strip())[-1] for c in columns.split(",")]
        kind, body = sections[export_file_name(table)]
        paragraph = body.split("Columns:", 1)[1].split("\n\n", 1)[0]
        assert re.findall(r"`([A-Za-z0-9_]+)`", paragraph) == written, f"docs/metrics.md: {table} export columns"
    documented = {n for n, (kind, _) in sections.items() if kind in ("csv", "parquet")}
    assert documented == {export_file_name(t) for t in {**EXPORTS, **ATTENTION_EXPORTS}}


def test_readme_and_help_point_to_the_metric_reference(capsys):
    readme = (REPO / "README.md").read_text()
    assert "(docs/metrics.md)" in readme
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "docs/metrics.md" in capsys.readouterr().out


def test_doc_parser_reads_sections_rows_and_same_columns():
    text = ("## A\n\n### `t` (table)\n\n| column | type | unit / range | meaning |\n|---|---|---|---|\n"
            "| `a` | INTEGER | | The `a` thing |\n| `b` | DOUBLE | [0, 1] | B |\n\n"
            "### `v` (view)\n\nSame columns as `t`, filtered.\n\n## B\n\n| `x` | X | | not in a section |\n")
    sections = doc_sections(text)
    assert set(sections) == {"t", "v"}
    assert documented_columns(sections, "v") == [("a", "INTEGER", "", "The `a` thing"), ("b", "DOUBLE", "[0, 1]", "B")]
