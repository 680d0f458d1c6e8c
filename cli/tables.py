"""The text tables the command line prints: fixed-width columns, numbers to 4 significant places, and
an estimate shown with its stored 95% interval in one cell (`0.9972 [0.9971, 0.9974]`).

Cells are escaped (`printable`): text from the warehouse (model names, messages, file paths) reaches
the terminal, and a control character in it must not move the cursor or change colours.
"""

from __future__ import annotations

import math

from warehouse.sources.names import terminal_safe

#: An estimate and the columns of its stored 95% interval, in order of preference: a column is shown
#: as `value [low, high]` when the table has the estimate and both ends of one of its intervals.
INTERVALS = {
    "ap_overall": (("ap_overall_ci_low", "ap_overall_ci_high"),),
    "plasticity": (("ap_ci_low", "ap_ci_high"),),  # AP_j of a query bucket (bucket_plasticity)
    # a layer mean: the interval from the heads' standard errors first, else the heads' t-interval
    "mean_ap": (("mean_ci_low", "mean_ci_high"), ("ci_low", "ci_high")),
}


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, newlines, tabs, bidi
    overrides) written as an escape (`warehouse.sources.names.terminal_safe`)."""
    return terminal_safe(text)


def format_value(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return printable(str(v))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def format_interval(value, low, high) -> str:
    """``0.9972 [0.9971, 0.9974]``; the value alone when an end is missing (NULL or NaN)."""
    if _finite(low) and _finite(high):
        if _finite(value) and max(abs(value), abs(low), abs(high)) >= 1e-3:  # one fixed format for the three
            return f"{value:.4f} [{low:.4f}, {high:.4f}]"
        return f"{format_value(value)} [{format_value(low)}, {format_value(high)}]"
    return format_value(value)


def with_intervals(names: list[str], rows: list[tuple]) -> tuple[list[str], list[list[str]]]:
    """The table's cells as text, each estimate of `INTERVALS` merged with its interval's columns
    (which are then dropped); other columns as `format_value` writes them."""
    index = {n: i for i, n in enumerate(names)}
    merged: dict[int, tuple[int, int]] = {}
    for value, choices in INTERVALS.items():
        for low, high in choices:
            if value in index and low in index and high in index and not {index[low], index[high]} & {
                    i for pair in merged.values() for i in pair}:
                merged[index[value]] = (index[low], index[high])
                break
    dropped = {i for pair in merged.values() for i in pair}
    keep = [i for i in range(len(names)) if i not in dropped]
    header = [names[i] for i in keep]
    cells = [[format_interval(r[i], r[merged[i][0]], r[merged[i][1]]) if i in merged else format_value(r[i])
              for i in keep] for r in rows]
    return header, cells


def format_table(names: list[str], rows: list[tuple], max_rows: int | None = None) -> str:
    """A plain fixed-width text table, estimates with their stored intervals (`with_intervals`)."""
    shown = rows if max_rows is None else rows[:max_rows]
    header, cells = with_intervals([printable(str(n)) for n in names], shown)
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(header)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more row(s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- `plasticity sql` output

#: Formats of `plasticity sql` (`--format`), and of `--output FILE` by its extension (.parquet too).
SQL_FORMATS = ("box", "csv", "json", "markdown")
OUTPUT_FORMATS = {".txt": "box", ".csv": "csv", ".json": "json", ".md": "markdown", ".parquet": "parquet"}


def output_format(path) -> str:
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"--output {str(path)!r}: the extension must be one of {', '.join(OUTPUT_FORMATS)} "
                         "(the format follows it)")
    return OUTPUT_FORMATS[suffix]


def fit_width(text_table: str, width: int | None) -> tuple[str, int]:
    """Keep the leftmost columns of a `format_table` text that fit in `width` characters (None or 0: all);
    returns the text and how many columns were left out."""
    lines = text_table.split("\n")
    if not width or max(len(line) for line in lines) <= width:
        return text_table, 0
    rule = lines[1]
    starts = [0] + [i + 2 for i in range(len(rule) - 1) if rule[i:i + 2] == "  "]
    ends = [rule.find(" ", s) if rule.find(" ", s) >= 0 else len(rule) for s in starts]
    keep = max(1, sum(1 for e in ends if e <= width))
    cut = ends[keep - 1]
    return "\n".join(line if line.startswith("... ") else line[:cut] for line in lines), len(starts) - keep


def csv_text(names: list[str], rows: list[tuple], for_terminal: bool = False) -> str:
    """CSV of the rows; `for_terminal`: control characters of text escaped as in the table (newlines
    and tabs stay, CSV quotes them), so untrusted text is shown, never obeyed."""
    import csv
    import io

    def safe(v):
        return terminal_safe(v, keep_lines=True) if for_terminal and isinstance(v, str) else v

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([safe(n) for n in names])
    w.writerows([safe(v) for v in r] for r in rows)
    return buf.getvalue()


def json_text(names: list[str], rows: list[tuple]) -> str:
    """A JSON array of objects, one per row; NaN and infinities as null (JSON has none)."""
    import json

    def plain(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    return json.dumps([{n: plain(v) for n, v in zip(names, r)} for r in rows], indent=1) + "\n"


def markdown_text(names: list[str], rows: list[tuple]) -> str:
    """A Markdown table, estimates with their intervals as in the text table; `|` in a cell escaped."""
    header, cells = with_intervals([printable(str(n)) for n in names], rows)

    def row(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return "\n".join([row(header), "|" + "|".join("---" for _ in header) + "|"] + [row(c) for c in cells]) + "\n"
