from .cache import KVCache
from .config import ModelConfig
from .transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
