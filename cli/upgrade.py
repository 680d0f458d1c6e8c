"""`plasticity upgrade`: bring a warehouse written by an older version to this version's schema."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from warehouse.settings.config import say_warehouse, warehouse_option
from warehouse.settings.options import add_arguments


@dataclass
class UpgradeOptions:
    warehouse: str | None = warehouse_option()


def add_upgrade_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("upgrade", help="bring a warehouse written by an older version to this version's schema")
    add_arguments(p, UpgradeOptions)
    p.set_defaults(func=cmd_upgrade)
    return p


def cmd_upgrade(args: argparse.Namespace) -> int:
    """`plasticity upgrade`: bring an existing warehouse to this version's schema (what `analyze` does first)."""
    from warehouse.store import db, schema
    from warehouse.settings.config import choose_warehouse

    path, source = choose_warehouse(args.warehouse)
    say_warehouse(path, source)
    db.check_file(path, for_writing=True)
    if not Path(path).exists():
        raise FileNotFoundError(f"warehouse {path} does not exist: nothing to upgrade")
    with db.reader(path) as con:
        before = schema.stored_version(con, path)
    after = db.ensure_schema(path)
    print(f"schema version {before} -> {after}" if after != before else f"schema version {after}: up to date")
    return 0
