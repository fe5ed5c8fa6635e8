"""kdzoo: a PyTorch Lightning model zoo for vision knowledge distillation over timm backbones."""

import os

__version__ = "0.1.0"

# albumentations asks PyPI for a newer version at every import; kdzoo runs offline and quietly.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
