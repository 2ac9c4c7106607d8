"""Writing a benchmark's JSON record (shared by the scripts in benchmarks/)."""

from __future__ import annotations

import json
import os


def write_record(path: str, record: dict, *, indent: int = 1) -> None:
  """Writes `record` as JSON to `path` (creating its folder) and says so."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=indent)
  print(f"Wrote {path}")
