"""Artifact contracts: one pyarrow schema + version per artifact, checked on write and on read.

The schema version travels inside every Parquet file (schema metadata key ``pseudoseg.schema``) so a reader can
tell an old or foreign file apart from a current one without guessing from the columns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"pseudoseg.schema"


def column(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    """One column of a contract: non-nullable unless said."""
    return pa.field(name, type_, nullable=nullable)


def columns(**types: pa.DataType) -> tuple[pa.Field, ...]:
    """A group of non-nullable columns several contracts share, in the order given."""
    return tuple(column(name, type_) for name, type_ in types.items())


def schema(*columns: pa.Field) -> pa.Schema:
    return pa.schema(list(columns))


# The ingested image a row is about: its id and its (original) size.
IMAGE_COLUMNS = columns(image_id=pa.string(), height=pa.int32(), width=pa.int32())
# The class of a vocabulary a row is about: its label value and name.
CLASS_COLUMNS = columns(class_index=pa.int32(), class_name=pa.string())
# A bounding box, COCO xywh pixels (float, as pycocotools' toBbox).
BBOX = pa.list_(pa.float64(), 4)
# One mask as every mask table stores it (readers decode it with pycocotools): COCO compressed RLE counts of a
# height x width mask, its area (pixels) and its bounding box.
MASK_COLUMNS = columns(height=pa.int32(), width=pa.int32(), rle_counts=pa.string(), area=pa.int64(), bbox=BBOX)


class SchemaError(ValueError):
    """An artifact does not match its contract. The message names the file, the field and expected vs found."""


@dataclass(frozen=True)
class Contract:
    """Name + version + pyarrow schema of one artifact kind."""

    name: str
    version: int
    schema: pa.Schema

    @property
    def tag(self) -> str:
        return f"{self.name}/v{self.version}"

    def table(self, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
        """Rows (dicts) → table of exactly this schema; a missing, extra or mistyped field is a SchemaError."""
        rows = list(rows)
        names = set(self.schema.names)
        for i, row in enumerate(rows):
            extra = set(row) - names
            missing = names - set(row)
            if extra or missing:
                raise SchemaError(
                    f"{self.tag}: row {i} has extra fields {sorted(extra)} / missing fields {sorted(missing)}"
                )
        columns = []
        for field in self.schema:
            values = [row[field.name] for row in rows]
            try:
                columns.append(pa.array(values, type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
                found = sorted({type(v).__name__ for v in values})
                raise SchemaError(
                    f"{self.tag}: field '{field.name}' expected {field.type}, found values of type {found}: {exc}"
                ) from exc
        return self.stamp(pa.Table.from_arrays(columns, schema=self.schema))

    def stamp(self, table: pa.Table) -> pa.Table:
        self.validate(table, where="<in memory>")
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = self.tag.encode()
        return table.replace_schema_metadata(meta)

    def validate(self, table: pa.Table, *, where: str | Path) -> None:
        """Field names, order, types and nullability must equal the contract's."""
        found = {f.name: f for f in table.schema}
        for field in self.schema:
            got = found.get(field.name)
            if got is None:
                raise SchemaError(f"{where}: {self.tag}: field '{field.name}' is missing (expected {field.type})")
            if not got.type.equals(field.type):
                raise SchemaError(
                    f"{where}: {self.tag}: field '{field.name}' has type {got.type}, expected {field.type}"
                )
            if not field.nullable and table.column(field.name).null_count:
                raise SchemaError(f"{where}: {self.tag}: field '{field.name}' holds nulls but is not nullable")
        extra = [n for n in table.schema.names if n not in self.schema.names]
        if extra:
            raise SchemaError(f"{where}: {self.tag}: unexpected fields {extra}")

    def check_version(self, metadata: Mapping[bytes, bytes] | None, *, where: str | Path) -> None:
        found = (metadata or {}).get(META_KEY, b"<none>").decode()
        if found != self.tag:
            raise SchemaError(f"{where}: schema version mismatch: expected {self.tag}, found {found}")

    # -- Parquet ------------------------------------------------------------------------------------------
    def to_parquet_bytes(self, table: pa.Table, *, row_group_size: int | None = None) -> bytes:
        """Serialise deterministically (no statistics timestamps exist in Parquet; fixed writer options).
        ``row_group_size``: rows per row group (default: pyarrow's), e.g. so a reader can fetch one part."""
        table = self.stamp(table)
        buf = io.BytesIO()
        if table.num_rows == 0:
            # No row group at all (pyarrow writes one of 0 rows, on which HF datasets' Parquet reader fails):
            # an empty shard (most shards' rejects) reads as an empty table everywhere.
            pq.ParquetWriter(buf, table.schema, compression="zstd", write_statistics=True,
                             use_dictionary=True).close()
            return buf.getvalue()
        pq.write_table(table, buf, compression="zstd", write_statistics=True, use_dictionary=True,
                       row_group_size=row_group_size)
        return buf.getvalue()

    def read_parquet(self, path: str | Path) -> pa.Table:
        """Read a Parquet artifact, checking version first, then every field."""
        path = Path(path)
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise SchemaError(f"{path}: not a readable Parquet file for {self.tag}: {exc}") from exc
        self.check_version(schema.metadata, where=path)
        table = pq.read_table(path)
        self.validate(table, where=path)
        return table

    # -- JSON records (done.json and friends) ------------------------------------------------------------
    def to_json_bytes(self, record: Mapping[str, Any]) -> bytes:
        """One record validated against the schema, serialised as sorted, indented JSON with the version."""
        self.table([record])
        out = {"schema": self.tag, **record}
        return (json.dumps(out, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()

    def read_json(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SchemaError(f"{path}: not a readable JSON record for {self.tag}: {exc}") from exc
        found = record.pop("schema", "<none>")
        if found != self.tag:
            raise SchemaError(f"{path}: schema version mismatch: expected {self.tag}, found {found}")
        try:
            self.table([record])
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}") from exc
        return record
