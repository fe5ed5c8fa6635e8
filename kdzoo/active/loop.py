"""The active-learning loop of ActiveKD: train, test, select, reveal, retrain from scratch.

"PCoreSet: Effective Active Learning through Knowledge Distillation from Vision-Language Models"
(arXiv:2506.00910; code github.com/erjui/PCoreSet, ``train_active_others.py``):

1. Round 0: ``initial_per_class`` random images of every class are labelled (seeded by the seed
   alone, so every strategy starts from the same set); the rest of the training split is the
   unlabelled pool.
2. Every round ``r = 0..R`` builds a *fresh* module (same seed, so the same initial weights: the
   student is re-initialised, never fine-tuned from the previous round) and datamodule through
   :class:`~kdzoo.lightning_cli.KDCLI`, exactly as ``kdzoo fit`` would from the same config, trains
   it on the labelled set and the pool (:class:`~kdzoo.active.data.ActiveDataModule`), tests the
   final weights, runs the student over the pool and the labelled set (:mod:`kdzoo.active.pool`) and
   selects ``budget`` images (:mod:`kdzoo.active.strategies`), whose labels are revealed for round
   ``r + 1``. The last round selects too (what a further round would label), so ``rounds`` can be
   raised later and the run resumed without retraining anything.
3. After each round ``<out>/<strategy>/seed<S>/state.json`` is replaced atomically, then the
   round's rows are appended to ``rounds.csv`` and ``selected.csv`` (:mod:`kdzoo.active.report`).
   Rerunning the same command resumes after the last finished round; a config that differs from
   the one a state was made with in anything but ``active.rounds/strategies/seeds`` (and display
   settings) is refused, since continuing would mix two experiments.

Under DDP every rank runs this loop; the pool outputs are gathered and every rank selects the same
images (rank 0's picks are broadcast as well); only rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from kdzoo.active.data import ActiveDataModule, IndexedDataset, initial_labelled
from kdzoo.active.pool import predict_pool
from kdzoo.active.report import render, sync_rows
from kdzoo.active.strategies import STRATEGIES, select
from kdzoo.errors import ConfigError
from kdzoo.lightning_cli import KDCLI

__all__ = ["ActiveCLI", "ActiveConfig", "run_active"]

STATE_VERSION = 1
# Config keys that may change between a run and its resumption: what to run next, where the data
# and logs are, and what is shown.
RESUMABLE_KEYS = (
    "config",
    "seed_everything",
    "active.rounds",
    "active.strategies",
    "active.seeds",
    "active.fast",
    "active.keep_checkpoints",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "data.init_args.root",
    "data.init_args.num_workers",
    "data.init_args.download",
    "checkpoint",
    "prediction_writer",
    "paper",
)


@dataclass
class ActiveConfig:
    """The ``active:`` block of a config.

    Attributes:
        initial_per_class: labelled images per class in round 0 (the paper's 1-shot start).
        budget: images labelled per round; ``None`` is the number of classes (the paper's choice).
            The training split must hold ``initial_per_class * C + rounds * budget`` images.
        rounds: rounds after round 0 (the paper: 15, from 1 to 16 images per class).
        strategies: selection rules to compare (:data:`~kdzoo.active.strategies.STRATEGIES`).
        seeds: seeds to run each strategy with (initial set, weights, data order).
        unlabelled: train on the unlabelled pool too (distillation); ``False`` trains on the
            labelled set alone (active learning without distillation, e.g. with ``Supervised``).
        keep_checkpoints: keep every round's checkpoints (``checkpoint.*`` settings); by default
            none are written, as the loop tests and selects with the weights in memory.
        fast: command-line overrides applied by ``--fast`` (``run_active(fast=True)``), e.g.
            ``["--trainer.max_epochs=1", "--active.rounds=2"]``.
    """

    initial_per_class: int = 1
    budget: int | None = None
    rounds: int = 15
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0])
    unlabelled: bool = True
    keep_checkpoints: bool = False
    fast: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.initial_per_class < 1:
            raise ConfigError(
                f"active.initial_per_class must be >= 1, got {self.initial_per_class}"
            )
        if self.budget is not None and self.budget < 1:
            raise ConfigError(
                f"active.budget must be >= 1 (or null: one per class), got {self.budget}"
            )
        if self.rounds < 0:
            raise ConfigError(f"active.rounds must be >= 0, got {self.rounds}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(
                f"active.strategies={self.strategies}: unknown {unknown}; choose from {STRATEGIES}"
            )
        for name, values in (("strategies", self.strategies), ("seeds", self.seeds)):
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"active.{name} must list each value once, got {values}")


class ActiveCLI(KDCLI):
    """:class:`~kdzoo.lightning_cli.KDCLI` that also accepts the ``active:`` block of a config."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(ActiveConfig, "active")

    def parse_arguments(self, parser, args) -> None:
        # The loop passes every round's arguments itself, while `kdzoo active run ...` is in
        # sys.argv: Lightning's warning against giving both does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)


class _ConfigOnlyCLI(ActiveCLI):
    """Parses and checks a config without building anything."""

    def instantiate_classes(self) -> None:
        pass


def run_active(
    config_path: str | Path | Sequence[str | Path],
    out: str | Path,
    seeds: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
    fast: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Run (or resume) the active-learning experiment of a config; return ``out``.

    Args:
        config_path: a kdzoo fit config with an ``active:`` block, or several merged in order
            (as repeated ``-c`` of ``kdzoo fit``).
        out: results directory (``rounds.csv``, ``selected.csv``, ``active.md``, ``active.png``
            and a folder per strategy and seed with its ``state.json`` and round logs).
        seeds: run these seeds instead of ``active.seeds``.
        strategies: run these strategies instead of ``active.strategies``.
        fast: apply the config's ``active.fast`` overrides (a minute-long preset).
        overrides: further command-line arguments, e.g.
            ``["--model.init_args.teacher.weights=teacher.ckpt"]``.
    """
    paths = [config_path] if isinstance(config_path, (str, Path)) else list(config_path)
    args = [f"--config={p}" for p in paths] + list(overrides)
    config, settings = _parse(args)
    if fast:
        args += settings.fast
        config, settings = _parse(args)
    if seeds is not None:
        settings.seeds = [int(s) for s in seeds]
    if strategies is not None:
        settings.strategies = list(strategies)
    ActiveConfig(**asdict(settings))  # checks the replaced lists
    out = Path(out)
    fingerprint = _fingerprint(config)
    for strategy in settings.strategies:
        for seed in settings.seeds:
            _run_strategy_seed(args, config, settings, fingerprint, strategy, seed, out)
    if rank_zero_only.rank == 0:
        names = " + ".join(Path(p).stem for p in paths)
        title = f"kdzoo active {names}" + (" --fast" if fast else "")
        markdown = render(out, title)
        if markdown:
            print(markdown)
    return out


def _parse(args: list[str]) -> tuple[Any, ActiveConfig]:
    config = _ConfigOnlyCLI(args=args, run=False).config
    return config, ActiveConfig(**config.active.as_dict())


def _run_strategy_seed(
    args: list[str],
    config: Any,
    settings: ActiveConfig,
    fingerprint: dict[str, Any],
    strategy: str,
    seed: int,
    out: Path,
) -> None:
    """All rounds of one (strategy, seed) not finished yet."""
    run_dir = out / strategy / f"seed{seed}"
    state = _load_state(run_dir / "state.json", fingerprint, strategy, seed)
    if state is not None and rank_zero_only.rank == 0:
        sync_rows(out, state)  # rows an interruption kept from being written
    while state is None or len(state["rounds"]) <= settings.rounds:
        state = run_round(args, config, settings, fingerprint, strategy, seed, run_dir, state)
        if rank_zero_only.rank == 0:
            _save_state(run_dir / "state.json", state)
            sync_rows(out, state)


def run_round(
    args: list[str],
    config: Any,
    settings: ActiveConfig,
    fingerprint: dict[str, Any],
    strategy: str,
    seed: int,
    run_dir: Path,
    state: dict[str, Any] | None,
) -> dict[str, Any]:
    """Train, test and select for the next round of ``state`` (``None``: round 0); the new state."""
    start = time.perf_counter()
    r = 0 if state is None else len(state["rounds"])
    cli = ActiveCLI(args=_round_args(args, config, settings, seed, run_dir, r), run=False)
    base = cli.datamodule
    indices, labels = ActiveDataModule(base, []).train_targets()
    if state is None:
        per_class, num_classes = settings.initial_per_class, base.num_classes
        initial = initial_labelled(indices, labels, per_class, num_classes, seed)
        state = {
            "version": STATE_VERSION,
            "strategy": strategy,
            "seed": seed,
            "fingerprint": fingerprint,
            "initial": initial.tolist(),
            "rounds": [],
        }
    labelled = labelled_set(state)
    datamodule = ActiveDataModule(base, labelled, unlabelled=settings.unlabelled)
    budget = settings.budget or base.num_classes
    check_budget(len(indices), len(state["initial"]), budget, settings.rounds)

    trainer, model = cli.trainer, cli.model
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    top1 = 100.0 * float(metrics["test/top1"])

    selected: list[int] = []
    pool_size = len(indices) - len(labelled)
    if pool_size >= budget:  # the last round's pool may be too small: then nothing is selected
        selected = select_next(model, datamodule, strategy, budget, seed, r, trainer.strategy)
    label_of = dict(zip(indices.tolist(), labels.tolist(), strict=True))
    record = {
        "round": r,
        "n_labelled": len(labelled),
        "test_top1": round(top1, 4),
        "wall_clock_s": round(time.perf_counter() - start, 1),
        "selected": selected,
        "labels": [label_of[i] for i in selected],
    }
    print(
        f"kdzoo active: {strategy} seed {seed} round {r}: {len(labelled)} labelled, "
        f"test top-1 {top1:.2f}%",
        file=sys.stderr,
    )
    return {**state, "rounds": [*state["rounds"], record]}


def select_next(
    model: torch.nn.Module,
    datamodule: ActiveDataModule,
    strategy: str,
    budget: int,
    seed: int,
    round_: int,
    trainer_strategy: Any = None,
) -> list[int]:
    """Dataset indices of the ``budget`` pool images ``strategy`` picks with ``model``."""
    hp = datamodule.base.hparams

    def run(dataset):
        return predict_pool(
            model,
            IndexedDataset(dataset),
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            strategy=trainer_strategy,
        )

    pool = run(datamodule.pool)
    if not torch.equal(pool.indices, torch.as_tensor(datamodule.pool_indices)):
        raise RuntimeError("the gathered pool outputs do not cover the pool exactly once")
    labelled = run(datamodule.labelled_eval) if strategy in ("coreset", "pcoreset") else None
    generator = torch.Generator().manual_seed(_round_seed(seed, round_))
    picks = select(
        strategy,
        budget=budget,
        probs=pool.probs,
        features=pool.features,
        labelled_probs=None if labelled is None else labelled.probs,
        labelled_features=None if labelled is None else labelled.features,
        generator=generator,
    )
    selected = pool.indices[picks].tolist()
    if trainer_strategy is not None and getattr(trainer_strategy, "world_size", 1) > 1:
        # Every rank computed the same picks from the same gathered outputs; rank 0's are
        # broadcast anyway, so a rounding difference between devices can never split the ranks.
        selected = trainer_strategy.broadcast(selected, src=0)
    return selected


def labelled_set(state: dict[str, Any]) -> list[int]:
    """The labelled dataset indices for the round after those recorded in ``state``."""
    labelled = list(state["initial"])
    for record in state["rounds"]:
        labelled += record["selected"]
    return labelled


def check_budget(n_train: int, n_initial: int, budget: int, rounds: int) -> None:
    """Refuse a run whose rounds would ask for more images than the pool holds.

    The selection rules themselves return the whole pool for such a budget (and the loop selects
    after the last round only if the pool allows); here the loop stops before training.
    """
    needed = n_initial + rounds * budget
    if needed > n_train:
        raise ConfigError(
            f"active.budget={budget} is larger than the unlabelled pool: the {n_initial} initial "
            f"labelled images and active.rounds={rounds} rounds of {budget} need {needed} "
            f"training images, but the training split has {n_train}. Lower active.budget or "
            "active.rounds, or train on more data (data.train_subset)"
        )


def _round_seed(seed: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])


def _round_args(
    args: list[str], config: Any, settings: ActiveConfig, seed: int, run_dir: Path, round_: int
) -> list[str]:
    """``args`` plus the round's seed, log directory and checkpoint settings."""
    extra = [f"--seed_everything={seed}"]
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
    if init_args is not None and "save_dir" in init_args:
        extra += [
            f"--trainer.logger.init_args.save_dir={run_dir}",
            f"--trainer.logger.init_args.name=round{round_}",
        ]
    if not settings.keep_checkpoints:
        extra += ["--checkpoint.save_top_k=0", "--checkpoint.save_last=false"]
    return [*args, *extra]


def _fingerprint(config: Any) -> dict[str, Any]:
    """The config as plain data, without the keys a resumed run may change."""
    plain = json.loads(json.dumps(config.as_dict(), default=str))
    for key in RESUMABLE_KEYS:
        *parents, last = key.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return plain


def _load_state(
    path: Path, fingerprint: dict[str, Any], strategy: str, seed: int
) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION or (state["strategy"], state["seed"]) != (
        strategy,
        seed,
    ):
        raise ConfigError(f"{path} is not a kdzoo active state of {strategy} seed {seed}")
    differences = _differences(state["fingerprint"], fingerprint)
    if differences:
        shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        raise ConfigError(
            f"cannot resume {path.parent}: the config differs from the one its "
            f"{len(state['rounds'])} finished rounds used ({shown}). Restore the config, or "
            "write to another --out directory"
        )
    return state


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a crash leaves the old state or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
