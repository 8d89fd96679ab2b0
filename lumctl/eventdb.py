"""The relational half of `tokenize`, out of core on DuckDB (embedded; spills to disk past its memory limit).

A raw log becomes table `raw` (user, item, timestamp, optional rating and the format's other
columns, in file order) of a DuckDB database inside the stage's temporary folder. With SQL, from it:
malformed rows (counted, or the first one reported with its line), events outside `time_range`,
duplicate (user, item, timestamp) events, condition codes, the item and user filters, the sorted
vocabularies, and the kept events sorted by (user, timestamp, file order) in Arrow batches.
Nothing here makes a Python object per event; memory is DuckDB's `memory_gb` plus one batch.

Vocabulary order is numeric when every id of a column is an integer, lexical otherwise (the same
rule as `tokenize._sorted_vocab`, the in-memory reference).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from lumctl.errors import InputError

INT_RE = r"\s*[-+]?[0-9]+\s*"


def connect(folder: Path, memory_gb: float, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A database file in `folder` (removed with it), spilling to `folder/spill` past `memory_gb`."""
    con = duckdb.connect(str(folder / "events.duckdb"))
    threads = threads or len(os.sched_getaffinity(0))
    con.execute(f"SET memory_limit = '{memory_gb:g}GB'")
    con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET temp_directory = '{folder / 'spill'}'")
    con.execute("SET preserve_insertion_order = true")  # `raw`'s rowid is the file order ...
    con.execute("SET checkpoint_threshold = '1000TB'")     # ... and no checkpoint compacts deleted rows away
    con.execute("SET enable_progress_bar = false")
    return con


def stream(con: duckdb.DuckDBPyConnection, sql: str, rows: int):
    """Arrow record batches of a query's result, `rows` at a time."""
    rel = con.sql(sql)
    reader = rel.to_arrow_reader(rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(rows)
    yield from reader


def scalar(con: duckdb.DuckDBPyConnection, sql: str):
    return con.execute(sql).fetchall()[0][0]


def numpy_column(con: duckdb.DuckDBPyConnection, sql: str) -> np.ndarray:
    """The single column of a (small) query result as numpy."""
    t = con.sql(sql).arrow()
    t = t.read_all() if hasattr(t, "read_all") else t
    return t.column(0).to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------------------------ loading
def load_csv(con: duckdb.DuckDBPyConnection, path: Path, columns: dict[str, str], *, strict: bool,
             header: bool = False, delimiter: str = ",") -> int:
    """CREATE TABLE raw from a delimited file (plain or .gz) with the given {column: SQL type}.
    Rows with the wrong number of fields or an unparseable value are skipped and counted; with
    `strict` the first one is an InputError naming its line. Returns the number skipped."""
    if not path.is_file():
        raise InputError(str(path), "file not found")
    cols = ", ".join(f"'{k}': '{v}'" for k, v in columns.items())
    try:
        con.execute(f"""CREATE TABLE raw AS SELECT * FROM read_csv('{_sql_str(path)}', header = {str(header).lower()},
            auto_detect = false, delim = '{_sql_str(delimiter)}', quote = '"', escape = '"', columns = {{{cols}}},
            ignore_errors = true, store_rejects = true, rejects_table = 'rejects_errors',
            rejects_scan = 'rejects_scans')""")
    except duckdb.Error as e:
        raise InputError(str(path), f"cannot read: {str(e).splitlines()[0]}") from None
    bad = scalar(con, "SELECT count(DISTINCT line) FROM rejects_errors")
    if bad and strict:
        line, col, kind, msg = con.execute(
            "SELECT line, column_name, error_type, error_message FROM rejects_errors ORDER BY line LIMIT 1").fetchall()[0]
        raise InputError(f"{path}:{line}", _reject_message(kind, col, msg, len(columns)))
    if scalar(con, "SELECT count(*) FROM raw") == 0:
        raise InputError(str(path), "empty file: no events" if not bad else "no valid events in the log")
    return int(bad)


def _reject_message(kind: str, col: str, msg: str, n_fields: int) -> str:
    """DuckDB's reason for rejecting a row, in the words of the other readers."""
    if kind in ("MISSING COLUMNS", "TOO MANY COLUMNS"):
        found = re.search(r"Found:\s*(\d+)", msg)
        return f"expected {n_fields} fields, got {found.group(1) if found else '?'}"
    if kind == "CAST":
        value = re.search(r'string "(.*)" to', msg)
        return f"field '{col}': expected a number, got {value.group(1)!r}" if value else f"field '{col}': {msg.splitlines()[0]}"
    return msg.splitlines()[0]


def load_arrow(con: duckdb.DuckDBPyConnection, table: pa.Table, name: str = "raw") -> None:
    """CREATE TABLE `name` from an in-memory Arrow table (the small formats' readers; small side tables)."""
    con.register("source_table", table)
    con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM source_table')
    con.unregister("source_table")


def _sql_str(v) -> str:
    return str(v).replace("'", "''")


# ------------------------------------------------------------------------------------ SQL pieces
def copies(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """CREATE TABLE copies(id): rowids of the rows of `table` whose (user, item, timestamp) an earlier row
    (in rowid order) has too. Grouping by one 64-bit hash of the triple keeps the aggregate small; every
    candidate is then checked against its group's first row, so a hash collision never drops an event."""
    con.execute(f"""CREATE TEMP TABLE dup_groups AS SELECT hash(user, item, timestamp) AS h, min(rowid) AS first
                    FROM {table} GROUP BY 1 HAVING count(*) > 1""")
    con.execute(f"""CREATE TABLE copies AS SELECT r.rowid AS id FROM {table} r
                    JOIN dup_groups g ON hash(r.user, r.item, r.timestamp) = g.h
                    JOIN {table} f ON f.rowid = g.first
                    WHERE r.rowid <> g.first AND r.user = f.user AND r.item = f.item AND r.timestamp = f.timestamp""")


def is_integer_type(con: duckdb.DuckDBPyConnection, table: str, col: str) -> bool:
    typ = con.execute(f"SELECT data_type FROM information_schema.columns WHERE table_name = '{table}' "
                      f"AND column_name = '{col}'").fetchall()[0][0]
    return typ in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")


def vocab_order(con: duckdb.DuckDBPyConnection, table: str, col: str) -> str:
    """ORDER BY clause of `col`'s vocabulary: numeric when every value is an integer, else lexical."""
    if is_integer_type(con, table, col):
        return f'"{col}"'
    all_int = scalar(con, f"""SELECT coalesce(bool_and(regexp_full_match(v, '{INT_RE}')
                                  AND TRY_CAST(v AS BIGINT) IS NOT NULL), true)
                              FROM (SELECT DISTINCT CAST("{col}" AS VARCHAR) AS v FROM {table})""")
    return f'TRY_CAST("{col}" AS BIGINT), CAST("{col}" AS VARCHAR)' if all_int else f'CAST("{col}" AS VARCHAR)'


def make_vocab(con: duckdb.DuckDBPyConnection, name: str, source: str, col: str, first_code: int) -> int:
    """CREATE TABLE `name`(value, code): the distinct values of `source`.`col` in vocabulary order,
    codes first_code, first_code + 1, ...; returns the vocabulary size."""
    con.execute(f'CREATE TEMP TABLE "_{name}_distinct" AS SELECT DISTINCT "{col}" FROM {source}')
    order = vocab_order(con, f"_{name}_distinct", col)
    con.execute(f"""CREATE TABLE "{name}" AS SELECT "{col}" AS value,
                    CAST(row_number() OVER (ORDER BY {order}) - 1 + {first_code} AS INTEGER) AS code
                    FROM "_{name}_distinct" ORDER BY code""")
    return int(scalar(con, f'SELECT count(*) FROM "{name}"'))


def vocab_strings(con: duckdb.DuckDBPyConnection, name: str) -> np.ndarray:
    """A vocabulary table's values as strings, in code order."""
    return numpy_column(con, f'SELECT CAST(value AS VARCHAR) FROM "{name}" ORDER BY code').astype(str)
