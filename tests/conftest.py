"""Shared pytest set-up: everything runs offline, on CPU, with few threads."""

from __future__ import annotations

import os

import pytest
import torch

# Set before timm / huggingface_hub are imported by any test module, so no test can reach the
# network (weights are never downloaded in tests: `pretrained=False`, generated data).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the Hugging Face Hub offline even if a test or library changed the environment, and
    kdzoo's caches (``$KDZOO_HOME``) out of the user's home."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KDZOO_HOME", str(tmp_path_factory.mktemp("kdzoo_home")))


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """One intra-op thread: the test tensors are tiny, and on the 2-core CI machine OpenMP's
    spin-waiting with 2 threads collapses whenever anything else runs (subprocess CLI tests, a
    parallel job): the model and contract tests took 64 s instead of 7 s under such load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """A small ``test_resnet`` Digits teacher trained once per session through ``kdzoo fit``."""
    from cli_helpers import train_teacher

    return train_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def export_runs(tmp_path_factory):
    """One small checkpoint of every method family (tests/export_helpers.py), shared by the
    export tests."""
    from export_helpers import build_runs

    return build_runs(tmp_path_factory)
