from bitplan.model.layers import EmbeddingInfo, LayerInfo, LayerTable, build_layer_table
from bitplan.model.loading import LoadedModel
from bitplan.model.open import load_exported, load_model

__all__ = [
    "EmbeddingInfo",
    "LayerInfo",
    "LayerTable",
    "LoadedModel",
    "build_layer_table",
    "load_exported",
    "load_model",
]
