"""The per-class csv (``lvis_per_class.csv``) that every evaluation writes next to its metrics:
one row per category, its frequency group, training image count, ground-truth counts and
per-task AP in percent (blank where undefined). This module is its one reader and writer; it
needs neither torch nor detectron2, so run comparisons work on any machine.
"""

import csv
from typing import List, Optional, Sequence

from lvis_longtail.utils.io import atomic_write

CSV_FILE = "lvis_per_class.csv"
# Columns kept as text; every other cell is parsed as a number (blank = None).
TEXT_COLUMNS = ("name", "frequency")


def write_per_class_csv(path: str, rows: List[dict], empty_columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts with the same keys) atomically; blank cells for None. A file with
    no rows gets the header ``empty_columns``."""
    fields = list(rows[0]) if rows else list(empty_columns)
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_per_class_csv(path: str) -> List[dict]:
    """The rows of a per-class csv: text columns as strings, other cells as int or float,
    blank cells as None (a cell that is not a number stays a string).

    Raises:
        ValueError: naming the file (and line) when it is not a per-class csv or a
            ``category_id`` is not an integer.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "category_id" not in reader.fieldnames:
            raise ValueError(f"{path}: not a per-class csv (no 'category_id' column)")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {k: (v if k in TEXT_COLUMNS else _number(v)) for k, v in raw.items()}
            if not isinstance(row["category_id"], int):
                raise ValueError(f"{path}: line {line}: category_id {raw['category_id']!r}")
            rows.append(row)
    return rows


def _number(value: Optional[str]):
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value
