"""Contract of the model probe: what each configured model role returned on one image."""

from __future__ import annotations

import pyarrow as pa

from pseudoseg.schemas.contract import Contract, column, schema

MODEL_PROBE = Contract("model_probe", 1, schema(
    column("role", pa.string()),
    column("model", pa.string()),  # id or local path the role was loaded from
    column("output", pa.string()),  # e.g. "cls", "patch", "logits", "caption"
    column("shape", pa.list_(pa.int64())),
    column("dtype", pa.string()),
))
