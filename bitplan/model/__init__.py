from bitplan.model.layers import EmbeddingInfo, LayerInfo, LayerTable, build_layer_table
from bitplan.model.loading import LoadedModel


def __getattr__(name: str):
    # open.py reads bitplan's exports (bitplan.exporters), whose plans need bitplan.model.layers:
    # importing it only when asked for keeps `import bitplan.exporters` (or .plans) from a circle.
    if name in ("load_model", "load_exported"):
        from bitplan.model import open as opening

        return getattr(opening, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EmbeddingInfo",
    "LayerInfo",
    "LayerTable",
    "LoadedModel",
    "build_layer_table",
    "load_exported",
    "load_model",
]
