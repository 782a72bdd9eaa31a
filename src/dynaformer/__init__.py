"""dynaformer: transformer language models with dynamic residual weighting and dynamic attention spans."""

from .model import ModelConfig, Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "__version__"]
