"""Contract of the model probe: what each configured model role returned on one image."""

from __future__ import annotations

import pyarrow as pa

from schemas.contract import Contract

MODEL_PROBE = Contract(
    "model_probe",
    1,
    pa.schema(
        [
            pa.field("role", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # id or local path the role was loaded from
            pa.field("output", pa.string(), nullable=False),  # e.g. "cls", "patch", "logits", "caption"
            pa.field("shape", pa.list_(pa.int64()), nullable=False),
            pa.field("dtype", pa.string(), nullable=False),
        ]
    ),
)
