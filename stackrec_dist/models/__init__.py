"""Model architectures. Nothing here imports a distributed package."""

from stackrec_dist.config import ModelConfig
from stackrec_dist.models.recommender import PAD_ID, SequentialRecommender


def build_model(cfg: ModelConfig) -> SequentialRecommender:
    return SequentialRecommender(cfg)


__all__ = ["PAD_ID", "SequentialRecommender", "build_model"]
