from bitplan.model.layers import EmbeddingInfo, LayerInfo, LayerTable, build_layer_table
from bitplan.model.loading import LoadedModel, load_model

__all__ = [
    "EmbeddingInfo",
    "LayerInfo",
    "LayerTable",
    "LoadedModel",
    "build_layer_table",
    "load_model",
]
