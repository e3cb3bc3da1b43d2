"""metrics.csv: one row per epoch, written by rank 0 of a training run."""

from __future__ import annotations

import csv
from pathlib import Path

METRICS_NAME = "metrics.csv"


def read_metrics(path) -> list[dict]:
    """The metrics CSV as a list of {column: float} rows."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def append_metrics(path: Path, row: dict) -> None:
    """Append one row, writing the header first when the file is new."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop the rows of epochs after `epoch` (a killed run may have written them).

    The kept rows are rewritten as the text they were, so an integer column stays an integer.
    """
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, [row for row in reader if float(row["epoch"]) <= epoch]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
