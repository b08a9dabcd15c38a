"""vitlab: the Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021)."""

from vitlab.checkpoint import from_pretrained
from vitlab.config import Preprocessing, ViTConfig
from vitlab.errors import CheckpointError
from vitlab.model import ViT, create_model

__version__ = "0.1.0"

__all__ = ["CheckpointError", "Preprocessing", "ViT", "ViTConfig", "__version__", "create_model", "from_pretrained"]
