"""Contract tests over every test-time adaptation method exported by :mod:`kdzoo.methods.tta`.

Methods are discovered, not listed (as ``test_contract.py`` does for classification): every
:class:`~kdzoo.methods.tta.TTAModule` subclass in ``kdzoo.methods.tta.__all__`` is built by one
recipe (a random-init ``test_resnet`` source, 1x32x32 inputs, 10 classes); a method that needs
more arguments adds them to :data:`METHOD_KWARGS`. The stream protocol runs twice: by hand
(:func:`run_protocol`, what Lightning's test loop does, without Lightning) and through a real
``lightning.Trainer(inference_mode=False).test``. The contract: finite ``(B, C)`` predictions, no
gradient ever on a parameter outside :meth:`~TTAModule.trainable_parameters` (teacher, anchor and
source copies included), every submodule in eval mode while adapting, BatchNorm on batch
statistics, a clear error under ``inference_mode=True``, ``reset="each_shift"`` back at the
initial state at each domain change, and ``state_dict`` round trips.
"""

from __future__ import annotations

import copy
import csv
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

import kdzoo.methods.tta
from kdzoo.datamodules import Digits
from kdzoo.errors import ConfigError
from kdzoo.methods.tta import TTAModule
from kdzoo.models import TeacherSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

METHODS: list[type[TTAModule]] = [
    obj
    for obj in (getattr(kdzoo.methods.tta, name) for name in kdzoo.methods.tta.__all__)
    if inspect.isclass(obj) and issubclass(obj, TTAModule) and not inspect.isabstract(obj)
]
METHOD_IDS = [cls.__name__ for cls in METHODS]

NUM_CLASSES = 10
BATCH = 8
# Digits' normalisation: RMT and PSMT check that their source data (Digits) matches the stream.
MEAN, STD = (0.3053,), (0.3759,)
COMMON_KWARGS: dict[str, Any] = {
    "source": TeacherSpec("test_resnet", weights="random"),
    "num_classes": NUM_CLASSES,
    "in_chans": 1,
    "mean": MEAN,
    "std": STD,
}


def source_data() -> Digits:
    """A fresh datamodule of RMT's and PSMT's labelled source data (per module: it is set up)."""
    return Digits(train_subset=64, batch_size=BATCH, augment=False)


# Extra constructor arguments a method needs beyond the generic recipe, keyed by class name.
METHOD_KWARGS: dict[str, Callable[[], dict[str, Any]]] = {
    "CoTTA": lambda: {"num_aug": 4},  # the 32 default passes add time, not coverage
    "RMT": lambda: {"source_data": source_data(), "warmup_samples": 2 * BATCH, "cache": False},
    "PSMT": lambda: {"source_data": source_data(), "fisher_samples": 2 * BATCH, "cache": False},
}


def build(cls: type[TTAModule], seed: int = 0, **overrides: Any) -> TTAModule:
    """The generic recipe: common kwargs, method extras, overrides; the source drawn from
    ``seed``."""
    extra = METHOD_KWARGS.get(cls.__name__, dict)()
    kwargs = {**COMMON_KWARGS, **extra, **overrides}
    torch.manual_seed(seed)
    try:
        return cls(**kwargs)
    except Exception as err:  # a discovered method the recipe does not cover
        pytest.fail(
            f"cannot construct {cls.__name__} from the generic TTA contract-test recipe "
            f"{cls.__name__}(**{kwargs!r}): {type(err).__name__}: {err}. Add the arguments it "
            f"needs to METHOD_KWARGS[{cls.__name__!r}] in {Path(__file__).name}.",
            pytrace=False,
        )


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def stream(domains: Sequence[int], seed: int = 0) -> list[Batch]:
    """One ``(images, labels, domain)`` batch per entry of ``domains``; images are normalised
    pixels of random [0,1] images, different per domain."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for domain in domains:
        images01 = (torch.rand(BATCH, 1, 32, 32, generator=gen) * (0.5 + 0.2 * domain)).clamp(0, 1)
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
        batches.append(((images01 - MEAN[0]) / STD[0], labels, torch.full((BATCH,), domain)))
    return batches


class AdaptSpy:
    """Wraps a module's ``adapt`` (as an instance attribute, which ``test_step`` calls): records
    its outputs and calls ``on_entry(module)`` before each call."""

    def __init__(self, module: TTAModule, on_entry: Callable[[TTAModule], None] | None = None):
        self.module, self.on_entry = module, on_entry
        self.original = module.adapt
        self.outputs: list[torch.Tensor] = []
        module.adapt = self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.on_entry is not None:
            self.on_entry(self.module)
        logits = self.original(images)
        self.outputs.append(logits.detach().clone())
        return logits


def run_protocol(
    module: TTAModule,
    batches: Sequence[Batch],
    on_entry: Callable[[TTAModule], None] | None = None,
) -> list[torch.Tensor]:
    """Lightning's test loop by hand: ``eval()``, ``on_test_start``, then ``test_step`` per batch
    in order, all under ``no_grad`` (what ``inference_mode=False`` gives); the predictions."""
    spy = AdaptSpy(module, on_entry)
    module.eval()
    try:
        with torch.no_grad():
            module.on_test_start()
            for index, batch in enumerate(batches):
                module.test_step(batch, index)
    finally:
        del module.adapt
    return spy.outputs


def trainable_ids(module: TTAModule) -> set[int]:
    return {id(p) for p in module.trainable_parameters()}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_discovery_finds_the_methods() -> None:
    names = set(METHOD_IDS)
    assert names, "no test-time adaptation method discovered"
    assert "TTAModule" not in names
    assert set(METHOD_KWARGS) <= names, f"unknown methods: {set(METHOD_KWARGS) - names}"


# ---- the protocol by hand -------------------------------------------------------------------


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_predictions_and_no_gradient_outside_the_trainable_set(cls) -> None:
    module = build(cls)
    batches = stream([0, 0, 1])
    before = snapshot(module)
    outputs = run_protocol(module, batches)
    assert len(outputs) == len(batches)
    for logits in outputs:
        assert logits.shape == (BATCH, NUM_CLASSES)
        assert torch.isfinite(logits).all()

    trainable = trainable_ids(module)
    for name, param in module.named_parameters():
        if id(param) not in trainable:
            assert param.grad is None, f"{cls.__name__}: gradient reached {name}"
    frozen_copies = [
        name
        for name, param in module.named_parameters()
        if not name.startswith("model.") and id(param) not in trainable and param.requires_grad
    ]
    assert not frozen_copies, f"{cls.__name__}: copies in autograd: {frozen_copies[:5]}"
    if any(p.requires_grad for p in module.trainable_parameters()):
        assert differs(before, snapshot(module)), f"{cls.__name__} adapted nothing"
    else:
        assert not differs(before, snapshot(module)), f"{cls.__name__} changed without training"


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_eval_mode_and_batch_statistics_while_adapting(cls) -> None:
    # Dropout in the source (timm's head dropout), so that train mode would show.
    source = TeacherSpec("test_resnet", weights="random", model_kwargs={"drop_rate": 0.5})
    module = build(cls, source=source, batch_norm="batch")
    modes: list[list[str]] = []

    def record(m: TTAModule) -> None:
        modes.append([name for name, sub in m.named_modules() if sub is not m and sub.training])

    run_protocol(module, stream([0, 1]), on_entry=record)
    assert modes == [[], []], f"{cls.__name__}: modules in train mode: {modes}"

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms
    for norm in norms:  # student and every copy normalise with the test batch's statistics
        assert not norm.track_running_stats and norm.running_mean is None
    # ...which shows: an image's logits depend on the rest of its batch.
    x = stream([0])[0][0]
    with torch.no_grad():
        alone = module(x[:4])
        together = module(x)[:4]
    assert (alone - together).abs().max() > 1e-4


# ---- a real Trainer ---------------------------------------------------------------------------


def loader(batches: Sequence[Batch]) -> DataLoader:
    images, labels, domains = (torch.cat(parts) for parts in zip(*batches, strict=True))
    return DataLoader(TensorDataset(images, labels, domains), batch_size=BATCH, shuffle=False)


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_lightning_test_runs_the_stream(cls, tmp_path: Path) -> None:
    module = build(cls)
    batches = stream([0, 0, 1])
    in_train_mode: list[str] = []

    def record(m: TTAModule) -> None:
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        in_train_mode.extend(n for n, sub in m.named_modules() if sub is not m and sub.training)

    spy = AdaptSpy(module, on_entry=record)
    trainer = quiet_trainer(tmp_path, inference_mode=False)
    results = trainer.test(module, dataloaders=loader(batches), verbose=False)
    del module.adapt

    assert len(spy.outputs) == len(batches)
    assert not in_train_mode, f"{cls.__name__}: modules in train mode: {in_train_mode[:5]}"
    wrong = [
        int((out.argmax(1) != b[1]).sum()) for out, b in zip(spy.outputs, batches, strict=True)
    ]
    errors = {0: 100 * sum(wrong[:2]) / (2 * BATCH), 1: 100 * wrong[2] / BATCH}
    logged = results[0]
    assert logged["test/error_0"] == pytest.approx(errors[0])
    assert logged["test/error_1"] == pytest.approx(errors[1])
    assert logged["test/mean_error"] == pytest.approx((errors[0] + errors[1]) / 2)
    with (tmp_path / "tta_stream.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["errors"]) for r in rows] == wrong
    assert [int(r["domain"]) for r in rows] == [0, 0, 1]

    trainable = trainable_ids(module)
    assert all(p.grad is None for p in module.parameters() if id(p) not in trainable)


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_inference_mode_is_a_clear_error(cls, tmp_path: Path) -> None:
    module = build(cls)
    trainer = quiet_trainer(tmp_path, inference_mode=True)
    with pytest.raises(ConfigError, match="inference_mode=false"):
        trainer.test(module, dataloaders=loader(stream([0])), verbose=False)


# ---- reset and state dicts -------------------------------------------------------------------


def states_seen_by_adapt(module: TTAModule, batches: Sequence[Batch]) -> list[dict]:
    """The module's state dict on entry to ``adapt``, for each batch of the protocol."""
    entries: list[dict[str, torch.Tensor]] = []
    run_protocol(module, batches, on_entry=lambda m: entries.append(snapshot(m)))
    return entries


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_reset_each_shift_restores_the_initial_state(cls) -> None:
    adapts = any(p.requires_grad for p in build(cls).trainable_parameters())
    for reset in ("each_shift", "never"):
        module = build(cls, reset=reset)
        entries = states_seen_by_adapt(module, stream([0, 0, 1, 1]))
        initial = entries[0]  # what on_test_start recorded: batch 0 sees no reset
        if reset == "each_shift":
            assert not differs(entries[2], initial), f"{cls.__name__}: not reset at the shift"
        if adapts:
            assert differs(entries[1], initial), f"{cls.__name__}: batch 0 changed nothing"
            assert differs(entries[3], initial)
            if reset == "never":
                assert differs(entries[2], initial), f"{cls.__name__}: reset without each_shift"


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_state_dict_round_trip(cls, tmp_path: Path) -> None:
    module = build(cls, seed=0)
    run_protocol(module, stream([0, 0]))  # an adapted state (student != teacher)
    state = module.state_dict()
    assert all(not v.requires_grad for v in state.values())
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)

    fresh = build(cls, seed=1)
    x = stream([0])[0][0]
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), module.eval()(x)), "seeds give one source"
    fresh.load_state_dict(loaded, strict=True)
    restored = fresh.state_dict()
    assert restored.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    # Loading does not put frozen copies back into autograd.
    for name, param in fresh.named_parameters():
        if not name.startswith("model."):
            module_param = dict(module.named_parameters())[name]
            assert param.requires_grad == module_param.requires_grad, name


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_deep_copy_is_independent(cls) -> None:
    """Deep copies (how the tests take "the model before the batch") share no tensors."""
    module = build(cls)
    run_protocol(module, stream([0]))
    clone = copy.deepcopy(module)
    ids = {id(p) for p in module.parameters()}
    assert not ids & {id(p) for p in clone.parameters()}
