"""The dataset card: ``<out>/<dataset>/README.md``, rewritten at the end of every run from the same rows as the
end-of-run table (tasks.summary). Per stage folder: what it holds (its declaration: tasks.stages.catalog), its schema (schemas/), the
models and parameters that made it (its ``params.json``), its counts; then how to read it with duckdb,
webdataset and pycocotools (copy-paste, run from the dataset root; tests/tasks/test_run_summary.py runs them)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pseudoseg.pipeline.core.artifacts import META_DIR, atomic_write_bytes, package_versions
from pseudoseg.schemas import REJECTS
from pseudoseg.tasks.report.summary import RunInfo, StageRow
from pseudoseg.tasks.stages.catalog import contract_of

# params.json keys naming a model (values: "<preset>:<id or path>", see models.registry.model_identity)
MODEL_KEYS = ("captioner", "grounder", "segmenter", "clip", "fmbseg_clip", "cam_clip", "classifier_clip", "dense",
              "dino")
PARAM_WIDTH = 100


def singular(unit: str) -> str:
    """images → image, boxes → box, classes → class."""
    if unit.endswith(("xes", "sses")):
        return unit[:-2]
    return unit[:-1] if unit.endswith("s") else unit


def _description(name: str) -> str:
    from pseudoseg.tasks.stages.catalog import stage_index

    return next((stage.makes for stage in stage_index() if stage.name == name), "")


def _params(row: StageRow) -> dict[str, Any]:
    path = row.stage_dir.params_path if row.stage_dir is not None else Path(row.path) / META_DIR / "params.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= PARAM_WIDTH else text[:PARAM_WIDTH - 1] + "…"


def _models(params: dict[str, Any]) -> dict[str, str]:
    # "<preset>:<name>"; the same key may name an upstream stage's hash instead (``dense`` = the FmbsegDense folder)
    found = {k: v for k, v in params.items() if k in MODEL_KEYS and isinstance(v, str) and ":" in v}
    nested = params.get("models")  # ModelProbe: the whole [models] content
    if isinstance(nested, dict):
        found.update({k: str(v) for k, v in nested.items() if v not in ("", None, []) and k not in ("cache_dir",
                                                                                                   "plugins")})
    return found


def _parameter_items(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """The settings of a ``params.json`` one per line: the stage's params fields, then its upstream stages' hashes
    (``upstream <name>``) and any other key (models are listed apart)."""
    own = params.get("params") if isinstance(params.get("params"), dict) else {}
    upstream = params.get("upstream") if isinstance(params.get("upstream"), dict) else {}
    rest = {k: v for k, v in params.items() if k not in ("params", "upstream", "models") or
            not isinstance(v, dict)}
    return [*sorted(own.items()), *((f"upstream {k}", v) for k, v in sorted(upstream.items())), *sorted(rest.items())]


def _glob(row: StageRow, suffix: str) -> str | None:
    """Relative glob (from the dataset root) of every shard's ``suffix`` file of the stage, located through its
    StageDir (never by hand: the stage folder layout may change)."""
    if row.stage_dir is None or not row.counted:
        return None
    example = row.stage_dir.shard_path(0, suffix)
    try:
        rel = example.relative_to(Path(row.stage_dir.root) / row.stage_dir.dataset)
    except ValueError:
        return None
    return str(rel).replace("000000", "??????")


def _schema_lines(row: StageRow) -> list[str]:
    contract = contract_of(row.stage)
    if contract is None:
        return []
    lines = [f"Schema `{contract.tag}` (one row per {singular(row.rows_are)}):", "",
             "| field | type |", "|---|---|"]
    lines += [f"| `{f.name}` | `{f.type}`{'' if f.nullable else ', not null'} |" for f in contract.schema]
    return [*lines, ""]


def _stage_section(row: StageRow, root: Path) -> list[str]:
    rel = Path(row.path).relative_to(root) if row.path.startswith(str(root)) else Path(row.path)
    lines = [f"### {row.name} — `{rel}/`", "", _description(row.name) or "", ""]
    if row.counted:
        reasons = ", ".join(f"{r} {c}" for r, c in row.reasons.most_common())
        lines.append(f"Counts: {row.done}/{row.shards} shards done; {row.records_in} {row.counts} in, {row.ok} ok, "
                     f"{row.rejected} rejected{f' ({reasons})' if reasons else ''}; "
                     f"{'?' if row.rows is None else row.rows} {row.rows_are} written.")
    else:
        lines.append(f"Counts: {row.done}/{row.shards} done" + (f"; {row.rows} {row.rows_are}"
                                                                 if row.rows is not None else "") + ".")
    for label, path in row.artifacts.items():
        lines.append(f"Open: `{label}` → `{path}`")
    if row.warning():
        lines.append(f"**Warning:** {row.warning()}")
    lines.append("")
    main, rejects = _glob(row, "parquet"), _glob(row, "rejects.parquet")
    if main and contract_of(row.stage) is not None:
        lines.append(f"Files: `{main}` (the rows below), `{rejects}` (schema `{REJECTS.tag}`: one row per "
                     f"rejected {singular(row.counts)}, with `reason` and `detail`), and per shard a done "
                     f"record listing every file with its size and sha256.")
        lines.append("")
    params = _params(row)
    models = _models(params)
    if models:
        lines += ["Models: " + ", ".join(f"{role} = `{name}`" for role, name in sorted(models.items())), ""]
    if params:
        lines += ["Parameters (`params.json`; upstream stages by their folder hash):", ""]
        lines += [f"- `{k}`: `{_short(v)}`" for k, v in _parameter_items(params)]
        lines.append("")
    return [*lines, *_schema_lines(row)]


def _reading(rows: list[StageRow]) -> list[str]:
    by_stage = {r.stage: r for r in rows}
    lines = ["## Reading it", "", "Run these from this folder (`cd` here first).", ""]
    segments = by_stage.get("use_segments") or next((r for r in rows if _glob(r, "parquet")), None)
    glob = _glob(segments, "parquet") if segments else None
    if glob:
        rejected = _glob(segments, "rejects.parquet")
        lines += ["**duckdb** (Python; the `duckdb` CLI takes the same SQL: `duckdb -c \"...\"`):", "",
                  "```python", "import duckdb", "",
                  f"print(duckdb.sql(\"SELECT * FROM read_parquet('{glob}') LIMIT 5\"))",
                  f"print(duckdb.sql(\"SELECT reason, count(*) AS n FROM read_parquet('{rejected}') "
                  "GROUP BY reason ORDER BY n DESC\"))", "```", ""]
    ingest = by_stage.get("ingest")
    tars = _glob(ingest, "tar") if ingest else None
    if tars and ingest.shards:
        last = f"{ingest.shards - 1:06d}"
        url = tars.replace("??????", f"{{000000..{last}}}")
        lines += ["**webdataset** (the images; every stage with a `.tar` reads the same way):", "",
                  "```python", "import webdataset as wds", "",
                  f"dataset = wds.WebDataset(\"{url}\", shardshuffle=False).decode(\"rgb\")",
                  "for sample in dataset:",
                  "    image = next(v for k, v in sample.items() if k in (\"jpg\", \"jpeg\", \"png\", \"webp\"))",
                  "    print(sample[\"__key__\"], image.shape, sorted(sample))",
                  "    break", "```", ""]
    coco = by_stage.get("export_coco")
    if coco and "coco.json" in coco.artifacts:
        rel = Path(coco.artifacts["coco.json"]).relative_to(Path(coco.path).parents[1])
        lines += ["**pycocotools** (the USE segment–text pairs; images under `data/` beside `coco.json`):", "",
                  "```python", "from pycocotools.coco import COCO", "",
                  f"coco = COCO(\"{rel}\")",
                  "print(len(coco.getImgIds()), \"images,\", len(coco.getAnnIds()), \"annotations\")",
                  "for ann in coco.loadAnns(coco.getAnnIds())[:3]:",
                  "    mask = coco.annToMask(ann)  # uint8 HxW at the size of data/<file_name>",
                  "    print(ann[\"image_id\"], mask.shape, int(mask.sum()), ann.get(\"expressions\", [])[:2])",
                  "```", ""]
    for row in rows:
        if row.stage.startswith("eval_") and row.done:
            lines += [f"**pyarrow** (the {row.stage.removeprefix('eval_')} evaluation: per-class IoU; `report.md` and "
                      "`grid.png` beside it):", "", "```python", "import pyarrow.parquet as pq", "",
                      f"rows = pq.read_table(\"{row.stage}/latest/per_class.parquet\").to_pylist()",
                      "scored = [r[\"iou\"] for r in rows if r[\"iou\"] is not None]",
                      "print(f\"mIoU {100 * sum(scored) / len(scored):.2f} over {len(scored)} classes\")",
                      "print(max(rows, key=lambda r: r[\"iou\"] or 0))", "```", ""]
    if len(lines) == 4:
        lines += ["(nothing to read yet: no stage of this dataset has finished)", ""]
    return lines


def card_text(rows: list[StageRow], info: RunInfo) -> str:
    root = Path(info.root)
    version = package_versions().get("pseudoseg", "?")
    ended = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(info.ended or time.time()))
    lines = [f"# {info.dataset}: pseudoseg dataset card", "",
             f"Written by `pseudoseg run {info.command}` at {ended} (pseudoseg {version}, settings "
             f"`{info.settings_hash}`) and rewritten at the end of every run. Images: `{info.images}`. "
             f"The same counts, machine-readable: `run.json`" + (f"; Luigi's log: `{Path(info.log).relative_to(root)}`"
                                                                if info.log and str(info.log).startswith(str(root))
                                                                else "") + ".", "",
             *([f"**Note:** {info.notice}", ""] if info.notice else []),
             "Every stage folder is `<stage>/<params-hash>/`: the hash covers the stage's parameters and models "
             "and every upstream stage's hash, so changed settings write a new folder; `<stage>/latest` links to the "
             "folder of the last complete run. Per shard: the table (`shard-NNNNNN.parquet`, the only Parquet "
             "files of the folder), payloads (`.tar` WebDataset, `.npy`), its rejects in `_rejects/` and its "
             "done record in `_meta/`.", "",
             "## Stages", "", "| stage | folder | counts | in | ok | rejected | rows written |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        counts = (r.records_in, r.ok, r.rejected) if r.counted else ("", "", "")
        written = "" if r.rows is None else f"{r.rows} {r.rows_are}"
        lines.append(f"| {r.name} | `{r.stage}` | {r.counts if r.counted else ''} | {counts[0]} | {counts[1]} | "
                     f"{counts[2]} | {written} |")
    warnings = [w for w in (r.warning() for r in rows) if w]
    if warnings:
        lines += ["", *[f"**Warning:** {w}" for w in warnings]]
    lines += ["", "## What each folder holds", ""]
    for r in rows:
        lines += _stage_section(r, root)
    lines += _reading(rows)
    return "\n".join(lines).rstrip() + "\n"


def write_card(rows: list[StageRow], info: RunInfo) -> Path:
    """``<out>/<dataset>/README.md``, atomically."""
    target = Path(info.root) / "README.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, card_text(rows, info).encode("utf-8"))
    return target
