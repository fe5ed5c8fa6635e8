"""kdzoo: a PyTorch Lightning model zoo for vision knowledge distillation over timm backbones.

``import kdzoo`` registers the CIFAR KD-benchmark nets (:mod:`kdzoo.models.cifar`) into timm's
model registry, so ``timm.create_model("resnet8x4", num_classes=100)`` works after it, whichever
of ``kdzoo`` and ``timm`` was imported first, without importing Lightning. It does so lazily:
``import kdzoo`` alone loads neither torch nor timm (``kdzoo --help`` answers before they load);
the nets are registered as soon as ``timm`` has finished importing.
"""

import importlib.abc
import os
import sys
from typing import Any

__version__ = "0.1.0"

# albumentations asks PyPI for a newer version at every import; kdzoo runs offline and quietly.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _register_cifar_nets() -> None:
    # kdzoo.models (the package this runs first) and kdzoo.models.cifar import torch and timm
    # only, not Lightning.
    import kdzoo.models.cifar  # noqa: F401


class _AfterTimmLoader(importlib.abc.Loader):
    """Runs timm's own loader, puts it back on the module, then registers the CIFAR nets."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # One shot: timm is imported once (removed here, not in find_spec, so that a mere
        # importlib.util.find_spec("timm") leaves the hook in place).
        for finder in [f for f in sys.meta_path if isinstance(f, _RegisterCifarNetsAfterTimm)]:
            sys.meta_path.remove(finder)
        module.__loader__ = module.__spec__.loader = self.loader  # resources etc. see timm's own
        self.loader.exec_module(module)
        _register_cifar_nets()


class _RegisterCifarNetsAfterTimm(importlib.abc.MetaPathFinder):
    """A one-shot import hook: the next import of ``timm`` registers the CIFAR nets once timm
    has finished importing, and takes the hook out of ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _AfterTimmLoader(spec.loader)
        return spec


if "timm" in sys.modules:
    _register_cifar_nets()
elif not any(isinstance(f, _RegisterCifarNetsAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterCifarNetsAfterTimm())
