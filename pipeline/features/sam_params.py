"""Settings of the shared SAM image embeddings (section ``[sam_embeddings]`` of luigi.cfg): the embedding stage's
params object, hashed whole into its folder name and passed whole to ``pipeline.features.sam_embeddings``, and
whether the SAM stages share it at all. Defaults are written here only; luigi.cfg repeats them for the reader (a
test keeps the two equal)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.params import StageParams, setting

DTYPES = ("float16", "float32")  # stored embedding dtypes


@dataclass(frozen=True)
class SamEmbeddingsParams(StageParams):
    dtype: str = setting("float16", choices=DTYPES, help="stored embedding dtype")
    batch_size: int = setting(4, ge=1, help="images per image-encoder forward (float rounding may differ with it, "
                              "so it is part of the stage hash)")


@dataclass(frozen=True)
class SamSharingParams(StageParams):
    """Not a stage's settings: whether the SAM stages read ``SamEmbedShard``'s embeddings (its hash then enters
    theirs as an upstream) or each encode the image themselves."""

    share: bool = setting(True, help="encode each image once and share it between the SAM stages")
