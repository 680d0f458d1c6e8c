"""`plasticity sql`: read-only SQL over one or more warehouse files, printed as a table fitted to the
terminal (estimates with their intervals), as CSV, JSON or Markdown, or written to a file."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from warehouse.settings.config import DEFAULT_WAREHOUSE, WAREHOUSE_ENV, not_empty, say_warehouse
from warehouse.settings.options import option
from warehouse.sources.names import terminal_safe


@dataclass
class SqlOptions:
    query: str = option(None, positional=True, metavar="QUERY",
                        help="SQL: any read-only statements (SELECT, PIVOT, WITH, temp tables, EXPLAIN, DESCRIBE, ...)")
    warehouse: list[str] | None = option(
        None, check=not_empty, cli_kwargs={"action": "append", "nargs": None}, metavar="FILE",
        accepts="a file, a glob or a path with {model}",
        help="DuckDB warehouse file (repeatable); with several files, each table and view reads the union of them all",
        default_text=f"${WAREHOUSE_ENV}, else {DEFAULT_WAREHOUSE}")
    format: str = option("box", choices=("box", "csv", "json", "markdown"),
                         help="box: a text table fitted to the terminal's width, estimates with their interval; "
                              "csv, json, markdown: every column")
    csv: bool = option(False, switch=True, help="same as --format csv")
    output: str | None = option(None, metavar="FILE", accepts="a .parquet, .csv, .json, .md or .txt file",
                                help="write every row there instead, in the format of the extension")
    max_rows: int = option(200, ge=1, help="rows shown in the table (box, markdown)")
    max_width: int | None = option(None, ge=0, help="characters per line of the box table; 0: no limit",
                                   default_text="the terminal's width ($COLUMNS, else 80)")


def _write_out(text: str, piece: int = 1 << 16) -> None:
    """`text` to stdout in pieces: a reader that stops early (`| head`) then shows as BrokenPipeError on
    the next piece (one large write into a pipe can end without an error when the reader has gone)."""
    for start in range(0, len(text), piece):
        sys.stdout.write(text[start:start + piece])
        sys.stdout.flush()


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from cli import tables
    from warehouse.settings.config import choose_warehouse
    from warehouse.store.db import expand_warehouse_paths, one_line
    from warehouse.store.sandbox import read_only_query

    given, source = (args.warehouse, "--warehouse") if args.warehouse else choose_warehouse(None)
    given = given if isinstance(given, list) else [given]
    paths = given
    fmt = "csv" if args.csv else args.format
    to_file = tables.output_format(args.output) if args.output else None  # a bad extension stops before the query
    try:
        paths = expand_warehouse_paths(given)  # before the sandbox: it lists no folder
        names, rows = read_only_query(paths, args.query, arrow=to_file == "parquet")
    except duckdb.Error as exc:  # parser, binder, catalog and permission errors: the user's query, not a bug
        print(f"error: {terminal_safe(one_line(exc))}", file=sys.stderr)
        return 2
    finally:  # a file the user did not name is said on stderr (the output stays the query's; errors one line)
        if not args.warehouse:
            say_warehouse(paths, source, sys.stderr)
    if to_file:
        from warehouse.present.figure_parts import write_atomically

        if to_file == "parquet":
            import io

            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(rows, buf, compression="zstd")
            data, n = buf.getvalue(), rows.num_rows
        else:
            render = {"box": tables.format_table, "csv": tables.csv_text, "json": tables.json_text,
                      "markdown": tables.markdown_text}[to_file]
            data, n = (render(names, rows) + ("\n" if to_file == "box" else "")).encode(), len(rows)
        write_atomically(args.output, data)
        print(f"wrote {args.output}: {n} row(s), {len(names)} column(s) ({to_file})")
        return 0
    if fmt == "csv":
        _write_out(tables.csv_text(names, rows, for_terminal=True))
    elif fmt == "json":
        _write_out(tables.json_text(names, rows))
    elif fmt == "markdown":
        _write_out(tables.markdown_text(names, rows[:args.max_rows]))
        if len(rows) > args.max_rows:
            print(f"\n... {len(rows) - args.max_rows} more row(s)")
    else:
        import shutil

        width = shutil.get_terminal_size().columns if args.max_width is None else args.max_width
        text, hidden = tables.fit_width(tables.format_table(names, rows, max_rows=args.max_rows), width)
        print(text)
        if hidden:
            print(f"... {hidden} more column(s) beyond {width} characters: --format csv|json|markdown, "
                  "--output FILE or --max-width 0 show them")
    return 0
