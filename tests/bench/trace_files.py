"""Small trace files written by tests, in both supported formats."""

from __future__ import annotations

import json
from pathlib import Path


def write_mooncake(path: Path, rows: list[tuple[int, int, int, list[int]]]) -> Path:
    """rows: (timestamp ms, input_length, output_length, hash_ids)."""
    path.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": h}) + "\n"
            for t, i, o, h in rows
        )
    )
    return path


def write_azure(path: Path, rows: list[tuple[str, object, object]]) -> Path:
    """rows: (timestamp text, context tokens, generated tokens)."""
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{i},{o}\n" for t, i, o in rows))
    return path
