"""retina-fgvis: FGVis explanations of a referable-DR classifier, turned into lesion detections.

Research use only, not a medical device and not a diagnosis.

Public API::

    from retina_fgvis import FGVis, activation_bounds
    result = FGVis(model, defense=True).attribute(x, target=1, game="deletion")
"""
from retina_fgvis.fgvis.defense import activation_bounds
from retina_fgvis.fgvis.games import GAMES, FGVis, FGVisSettings
from retina_fgvis.fgvis.result import FGVisResult

__version__ = "0.1.0"

__all__ = ["FGVis", "FGVisResult", "FGVisSettings", "GAMES", "activation_bounds", "load_classifier", "__version__"]


def __getattr__(name: str):
    # Lazy: the classifier pulls in timm, which the engine alone does not need.
    if name == "load_classifier":
        from retina_fgvis.classifier.model import load_classifier

        return load_classifier
    raise AttributeError(f"module 'retina_fgvis' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too (tab completion and ``dir()`` list ``load_classifier``)."""
    return sorted(set(globals()) | set(__all__))
