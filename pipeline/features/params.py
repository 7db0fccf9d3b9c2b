"""Settings of the feature stages (sections ``[features_use]``, ``[features_fmbseg]`` and ``[sam_embeddings]`` of
luigi.cfg; the last also says whether the SAM stages share the embeddings at all): one frozen params object per
stage, hashed whole into its folder name (``tasks.features``). Defaults are written here only;
luigi.cfg repeats them for the reader (a test keeps the two equal)."""

from __future__ import annotations

from dataclasses import dataclass

from pseudoseg.pipeline.core.params import StageParams, setting
from pseudoseg.pipeline.features.cache import TEXT_TEMPLATE_SETS

BLOCKS_HELP = "all | none | last:N | every:K | i,j,k"


@dataclass(frozen=True)
class FeaturesUseParams(StageParams):
    """The USE feature cache (FeaturesShard purpose=use): images squashed to one square, CLIP + DINOv2 blocks."""

    section = "features_use"  # its luigi.cfg section

    input_size: int = setting(0, ge=0, help="square side images are squashed to; 0 = CLIP's image_size (336 for "
                              "ViT-L/14-336); other sizes interpolate CLIP's positions")
    clip_blocks: str = setting("every:8", help=BLOCKS_HELP)
    dino_blocks: str = setting("last:2", help=BLOCKS_HELP)
    batch_size: int = setting(8, ge=1, help="images per encoder forward (float rounding may differ with it, so it is "
                              "part of the stage hash)")


@dataclass(frozen=True)
class UseTextParams(StageParams):
    """The CLIP text embeddings of the USE segments' texts (UseTextShard; section [features_use])."""

    section = "features_use"  # its luigi.cfg section

    text_templates: str = setting("use4", choices=tuple(sorted(TEXT_TEMPLATE_SETS)),
                                  help="templates averaged per expression")


@dataclass(frozen=True)
class FeaturesFmbsegParams(StageParams):
    """The FMbSeg feature cache (FeaturesShard purpose=fmbseg): DINOv2 tokens, aspect kept."""

    section = "features_fmbseg"  # its luigi.cfg section

    dino_blocks: str = setting("last:1", help=BLOCKS_HELP)
    short_side: int = setting(336, ge=1, help="DINOv2 input short side (patch multiples)")
    max_long_side: int = setting(672, ge=0, help="cap on the input long side; 0 = none")
    batch_size: int = setting(8, ge=1, help="images of one input size per DINOv2 forward (float rounding may differ "
                              "with it, so it is part of the stage hash)")


DTYPES = ("float16", "float32")  # stored embedding dtypes


@dataclass(frozen=True)
class SamEmbeddingsParams(StageParams):
    section = "sam_embeddings"  # its luigi.cfg section

    dtype: str = setting("float16", choices=DTYPES, help="stored embedding dtype")
    batch_size: int = setting(4, ge=1, help="images per image-encoder forward (float rounding may differ with it, "
                              "so it is part of the stage hash)")


@dataclass(frozen=True)
class SamSharingParams(StageParams):
    """Not a stage's settings: whether the SAM stages read ``SamEmbeddingsShard``'s embeddings (its hash then enters
    theirs as an upstream) or each encode the image themselves."""

    section = "sam_embeddings"  # its luigi.cfg section

    share: bool = setting(True, help="encode each image once and share it between the SAM stages")
