"""pseudoseg: models layer — role adapters over foundation models and the registry of presets.

- `roles`: the abstract roles (Captioner, Grounder, Segmenter, ClipEncoder, DenseEncoder) and their output records;
- `captioner`, `grounder`, `segmenter`, `clip`, `dense`: the transformers / segment-anything / groundingdino-py
  backends;
- `tiny`: offline random-init small models of the same architectures, built into a cache folder;
- `registry`: `ModelSettings` (luigi.cfg `[models]`), `load_role`, `register_preset`.
Heavy libraries are imported lazily by the backends, so importing `models.registry` stays cheap.
"""
