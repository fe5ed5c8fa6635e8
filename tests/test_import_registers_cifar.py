"""``import kdzoo`` registers the CIFAR KD-benchmark nets into timm, whichever of kdzoo and timm
is imported first, without importing Lightning, and without loading torch or timm itself
(``kdzoo --help`` relies on that; see ``test_cli_usability.py``). Fresh interpreters: the test
process has imported everything already."""

from __future__ import annotations

import subprocess
import sys

import pytest

CREATE = (
    "model = timm.create_model('resnet8x4', num_classes=100)\n"
    "assert type(model).__name__ == 'CifarResNet', type(model)\n"
    "assert model.num_classes == 100\n"
    "assert 'lightning' not in sys.modules, 'lightning was imported'\n"
    "assert not [f for f in sys.meta_path if 'kdzoo' in type(f).__module__], sys.meta_path\n"
    "assert timm.__spec__.loader is timm.__loader__\n"
    "assert type(timm.__loader__).__module__.startswith(('_frozen_importlib', 'importlib'))\n"
)


def _run(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "imports",
    [
        "import kdzoo\nimport timm\n",
        "import timm\nimport kdzoo\n",
        "import kdzoo\nimport timm.models\n",
    ],
    ids=["kdzoo-first", "timm-first", "timm-submodule"],
)
def test_import_kdzoo_registers_the_cifar_nets(imports):
    _run("import sys\n" + imports + "import timm\n" + CREATE)


def test_import_kdzoo_alone_loads_neither_torch_nor_timm():
    _run(
        "import sys\nimport kdzoo\n"
        "heavy = [m for m in ('torch', 'timm', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
