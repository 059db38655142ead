#!/usr/bin/env python3
"""Converts a Hugging Face Hub data set stored as Parquet into the JSONL our trainer reads.

The trainer never downloads and never reads Parquet: run this once, by hand, on files you downloaded
(docs/llama2-recipe.md), e.g. for mlabonne/guanaco-llama2-1k

    python scripts/convert_parquet.py data/guanaco-llama2-1k/data/train-*.parquet \
        -o data/guanaco-llama2-1k.jsonl

Every row becomes one JSON object per line with the selected columns (default: all of them), in file
order, files in the order given; strings are written as they are (UTF-8, no escaping of non-ASCII).
The result goes to a temporary file renamed into place, so a failed run leaves no half-written JSONL.
Needs pyarrow (`pip install pyarrow`), or else pandas with a Parquet engine; neither is one of the
project's pinned requirements, since only this user-run step uses them.
"""
import argparse
import json
import math
import os
import sys
import tempfile


def read_rows(path, columns):
    """The rows of one Parquet file as dicts, through pyarrow when available, else pandas."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        table = pq.read_table(path)
        names = table.column_names
        missing = [c for c in columns or [] if c not in names]
        if missing:
            sys.exit(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
        return table.select(columns or names).to_pylist()
    try:
        import pandas as pd
    except ImportError:
        sys.exit("convert_parquet.py needs pyarrow (pip install pyarrow) or pandas with a Parquet engine")
    df = pd.read_parquet(path)
    missing = [c for c in columns or [] if c not in df.columns]
    if missing:
        sys.exit(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(df.columns)})")
    rows = df[columns or list(df.columns)].to_dict(orient="records")
    # pandas turns missing values into NaN floats: write them as null, like pyarrow does.
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def plain(v):
    """JSON for what json cannot write: numpy scalars (pandas) as Python numbers, anything else as text."""
    return v.item() if hasattr(v, "item") else str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parquet", nargs="+", help="Parquet files, converted in the order given")
    ap.add_argument("-o", "--output", required=True, help="JSONL file to write")
    ap.add_argument("--columns", nargs="+", help="columns to keep (default: all), e.g. --columns text")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many rows (0 = all)")
    a = ap.parse_args()

    out_dir = os.path.dirname(os.path.abspath(a.output))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".convert-", suffix=".jsonl")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for path in a.parquet:
                for row in read_rows(path, a.columns):
                    if a.limit and n >= a.limit:
                        break
                    f.write(json.dumps(row, ensure_ascii=False, default=plain) + "\n")
                    n += 1
        os.replace(tmp, a.output)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"{a.output}: {n} records from {len(a.parquet)} file(s)")


if __name__ == "__main__":
    main()
