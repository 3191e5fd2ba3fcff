"""Train stage: two-stage fine-tuning (alignment, then instruction tuning) of a LLaVA model."""

from tinymed.train.config import (
    DEMO_DATA,
    DEMO_MODEL,
    DEMO_TOWER_CACHE_MB,
    DatasetSpec,
    FinetuneConfig,
    FinetuneResult,
    StageConfig,
    default_stages,
    demo_stages,
)
from tinymed.train.loop import finetune

__all__ = ["DEMO_DATA", "DEMO_MODEL", "DEMO_TOWER_CACHE_MB", "DatasetSpec", "FinetuneConfig", "FinetuneResult", "StageConfig", "default_stages", "demo_stages", "finetune"]
