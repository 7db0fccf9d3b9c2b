"""Contract of an evaluation run's per-class IoU table (``<out>/<benchmark>/eval_<method>/<hash>/per_class.parquet``).

One row per evaluation class, in label order. Counts are pixels accumulated over the whole evaluated set (one
confusion matrix, ignore pixels skipped): intersection = TP, union = TP + FP + FN. ``iou`` is null where the union
is empty (the class is neither in the GT nor predicted); mIoU is the mean of the non-null values.
"""

from __future__ import annotations

import pyarrow as pa

from pseudoseg.schemas.contract import Contract, column, schema

CLASS_IOU = Contract("class_iou", 1, schema(
    column("class_index", pa.int64()),  # label value in the benchmark's GT
    column("class_name", pa.string()),
    column("iou", pa.float64(), nullable=True),
    column("intersection", pa.int64()),
    column("union", pa.int64()),
))
