"""The active-learning loop: data split, pool outputs under (simulated and real) DDP, budget
checks, resuming at a round boundary, and ``kdzoo active run`` end to end.

PCoreSet / ActiveKD (arXiv:2506.00910; code github.com/erjui/PCoreSet). The loop runs on
scikit-learn's digits (no files needed) with a ``test_resnet`` DualHeadDistillation student.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import kdzoo
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from kdzoo.active import loop
from kdzoo.active.data import ActiveDataModule, IndexedDataset, initial_labelled
from kdzoo.active.loop import check_budget, run_active
from kdzoo.active.pool import merge_shards, predict_pool, run_model
from kdzoo.active.report import sync_rows
from kdzoo.cli import main
from kdzoo.datamodules import DataError, Digits
from kdzoo.errors import ConfigError
from kdzoo.methods import DualHeadDistillation

REPO = Path(__file__).resolve().parent.parent


def digits(train_subset: int = 120, **kwargs) -> Digits:
    return Digits(train_subset=train_subset, eval_subset=60, batch_size=40, image_size=16, **kwargs)


def write_config(directory: Path, teacher: str = "random", **active) -> Path:
    """A tiny active config: DHO test_resnet on 120 digits, 1 epoch, rounds of 10 labels."""
    config = {
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "kdzoo.methods.DualHeadDistillation",
            "init_args": {
                "student": "test_resnet",
                "teacher": {"name": "test_resnet", "weights": teacher},
            },
        },
        "data": {
            "class_path": "kdzoo.datamodules.Digits",
            "init_args": {
                "train_subset": 120,
                "eval_subset": 60,
                "batch_size": 40,
                "image_size": 16,
            },
        },
        "active": {
            "initial_per_class": 1,
            "budget": 10,
            "rounds": 1,
            "strategies": ["pcoreset"],
            "seeds": [0],
            **active,
        },
    }
    path = directory / "active.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- the labelled / unlabelled split ----------------------------------------------------------


def test_initial_labelled_set_is_per_class_and_seeded() -> None:
    datamodule = digits()
    indices, labels = ActiveDataModule(datamodule, []).train_targets()
    first = initial_labelled(indices, labels, 2, 10, seed=0)
    label_of = dict(zip(indices.tolist(), labels.tolist(), strict=True))
    assert sorted(label_of[i] for i in first) == sorted(list(range(10)) * 2)
    assert first.tolist() == initial_labelled(indices, labels, 2, 10, seed=0).tolist()
    assert first.tolist() != initial_labelled(indices, labels, 2, 10, seed=1).tolist()
    with pytest.raises(DataError, match=r"fewer than active\.initial_per_class=99"):
        initial_labelled(indices, labels, 99, 10, seed=0)


def test_active_datamodule_splits_the_training_set() -> None:
    base = digits()
    indices, labels = ActiveDataModule(base, []).train_targets()
    labelled = indices[[3, 50, 7]]
    datamodule = ActiveDataModule(base, labelled)
    datamodule.setup("fit")
    pool = datamodule.pool_indices
    assert sorted([*pool.tolist(), *labelled.tolist()]) == sorted(indices.tolist())
    assert np.all(np.diff(pool) > 0)
    # L is repeated to the pool's length; the pool's labels are hidden.
    assert len(datamodule.labelled_train) == len(pool) == 117
    assert set(datamodule.labelled_train.indices.tolist()) == set(labelled.tolist())
    assert set(datamodule.unlabelled_train.targets.tolist()) == {-1}

    loader = datamodule.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batch, _, _ = next(iter(loader))
    x, y = batch["labelled"]
    x_u, y_u = batch["unlabelled"]
    label_of = dict(zip(indices.tolist(), labels.tolist(), strict=True))
    assert set(y.tolist()) <= {label_of[i] for i in labelled.tolist()}
    assert x.shape == x_u.shape == (40, 1, 16, 16) and set(y_u.tolist()) == {-1}

    images, index = next(iter(datamodule.pool_dataloader()))
    assert index.tolist() == pool[:40].tolist() and images.shape == (40, 1, 16, 16)
    # Evaluation transforms: the pool image is the base's test-time view of that image.
    position = int(np.flatnonzero(base.train.indices == pool[0])[0])
    expected = base.build_transform(train=False)(image=base.train.load_image(pool[0]))["image"]
    assert position >= 0 and torch.equal(images[0], expected)

    without = ActiveDataModule(base, labelled, unlabelled=False)
    without.setup("fit")
    x, y = next(iter(without.train_dataloader()))
    assert len(without.train_dataloader().dataset) == 117 and x.shape[0] == 40


def test_labelled_images_outside_the_training_split_are_a_clear_error() -> None:
    base = digits()
    indices, _ = ActiveDataModule(base, []).train_targets()
    outside = sorted(set(range(1437)) - set(indices.tolist()))[0]
    with pytest.raises(DataError, match=rf"labelled images \[{outside}\] are not in"):
        ActiveDataModule(base, [int(indices[0]), outside]).setup("fit")
    with pytest.raises(DataError, match="more than once"):
        ActiveDataModule(base, [int(indices[0])] * 2)


# ---- pool outputs -----------------------------------------------------------------------------


def dho(**kwargs) -> DualHeadDistillation:
    torch.manual_seed(0)
    return DualHeadDistillation(
        student="test_resnet",
        num_classes=10,
        in_chans=1,
        teacher={"name": "test_resnet", "weights": "random"},
        **kwargs,
    )


def test_selection_reads_the_fused_probability_at_alpha_half_beta_one() -> None:
    model = dho(alpha=0.9, beta=2.0).eval()  # evaluation settings the selection must ignore
    x = torch.randn(4, 1, 16, 16)
    probs, features = run_model(model, x)
    with torch.no_grad():
        feature = model.student(x)
        ce, kd = model.ce_head(feature), model.kd_head(feature)
    expected = 0.5 * ce.double().softmax(1) + 0.5 * kd.double().softmax(1)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(features, feature)


class _FakeStrategy:
    """What :func:`predict_pool` reads of a DDP strategy, for one rank of two (no process
    group: each call returns that rank's shard)."""

    def __init__(self, rank: int, world_size: int = 2) -> None:
        self.global_rank, self.world_size = rank, world_size
        self.root_device = torch.device("cpu")


@pytest.mark.parametrize("pool_size", [37, 38])  # odd: the sampler pads one rank
def test_sharded_pool_outputs_merge_to_the_single_process_ones(pool_size: int) -> None:
    base = digits()
    indices, _ = ActiveDataModule(base, []).train_targets()
    datamodule = ActiveDataModule(base, indices[pool_size:])  # pool: the first pool_size images
    datamodule.setup("fit")
    dataset = IndexedDataset(datamodule.pool)
    model = dho()
    single = predict_pool(model, dataset, batch_size=8)
    # Each rank's shard as all_gather returns it: ceil(N / 2) images, the short one padded with
    # the first image; here in reverse rank order.
    shards = [predict_pool(model, dataset, batch_size=8, strategy=_FakeStrategy(r)) for r in (1, 0)]
    assert [len(s) for s in shards] == [-(-pool_size // 2)] * 2
    merged = merge_shards(shards)
    assert merged.indices.tolist() == single.indices.tolist() == indices[:pool_size].tolist()
    torch.testing.assert_close(merged.probs, single.probs)
    torch.testing.assert_close(merged.features, single.features)


# ---- budgets ----------------------------------------------------------------------------------


def test_check_budget() -> None:
    check_budget(n_train=100, n_initial=10, budget=30, rounds=3)  # exactly enough
    with pytest.raises(ConfigError, match=r"active.budget=31 is larger than the unlabelled pool"):
        check_budget(n_train=100, n_initial=10, budget=31, rounds=3)


def test_budget_larger_than_the_pool_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path, budget=200)
    with pytest.raises(ConfigError, match=r"need 210 training images, but the training split"):
        run_active(config, tmp_path / "out")
    assert not (tmp_path / "out" / "rounds.csv").exists()
    # The kdzoo command prints it as one line.
    args = ["active", "run", "-c", str(config), "--out", str(tmp_path / "out"), "--seed", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--active.budget=500"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("kdzoo active: error: active.budget=500 is larger than the unlabelled")


# ---- resuming ---------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_at_a_round_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, out = write_config(tmp_path, rounds=2), tmp_path / "out"
    real_round = loop.run_round
    calls: list[int] = []

    def interrupted_at_round_2(*args):
        state = args[-1]
        done = 0 if state is None else len(state["rounds"])
        if done == 2:
            raise Interrupted
        calls.append(done)
        return real_round(*args)

    monkeypatch.setattr(loop, "run_round", interrupted_at_round_2)
    with pytest.raises(Interrupted):
        run_active(config, out)
    assert calls == [0, 1]
    assert [r["round"] for r in read_csv(out / "rounds.csv")] == ["0", "1"]

    def counted(*args):
        state = args[-1]
        calls.append(len(state["rounds"]))
        return real_round(*args)

    calls.clear()
    monkeypatch.setattr(loop, "run_round", counted)
    run_active(config, out)
    assert calls == [2]  # rounds 0 and 1 are not redone
    rounds = read_csv(out / "rounds.csv")
    assert [(r["strategy"], r["round"], r["n_labelled"]) for r in rounds] == [
        ("pcoreset", "0", "10"), ("pcoreset", "1", "20"), ("pcoreset", "2", "30"),
    ]  # fmt: skip
    state = json.loads((out / "pcoreset" / "seed0" / "state.json").read_text())
    selected = read_csv(out / "selected.csv")
    assert [int(r["round"]) for r in selected] == [0] * 10 + [1] * 10 + [2] * 10
    picked = [int(r["index"]) for r in selected]
    assert len(set(picked)) == 30 and not set(picked) & set(state["initial"])
    assert (out / "active.md").is_file() and (out / "active.png").is_file()

    # Raising the number of rounds continues from the last one's picks; a changed config that
    # would mix two experiments is refused before anything runs.
    calls.clear()
    run_active(config, out, overrides=["--active.rounds=3"])
    assert calls == [3]
    with pytest.raises(ConfigError, match=r"model.init_args.temperature: was 2.0, now 4.0"):
        run_active(config, out, overrides=["--model.init_args.temperature=4"])
    assert calls == [3]


def test_sync_rows_appends_only_what_is_missing(tmp_path: Path) -> None:
    def record(r: int) -> dict:
        return {"round": r, "n_labelled": 10 * (r + 1), "test_top1": 50.0, "wall_clock_s": 1.0,
                "selected": [r, 100 + r], "labels": [1, 2]}  # fmt: skip

    state = {"strategy": "badge", "seed": 3, "rounds": [record(0)]}
    sync_rows(tmp_path, state)
    state["rounds"].append(record(1))  # e.g. saved just before an interruption
    sync_rows(tmp_path, state)
    sync_rows(tmp_path, state)
    assert [r["round"] for r in read_csv(tmp_path / "rounds.csv")] == ["0", "1"]
    selected = read_csv(tmp_path / "selected.csv")
    assert [(r["round"], r["index"], r["label"]) for r in selected] == [
        ("0", "0", "1"), ("0", "100", "2"), ("1", "1", "1"), ("1", "101", "2"),
    ]  # fmt: skip


def test_shipped_config_parses_with_its_fast_preset() -> None:
    args = [f"--config={REPO / 'configs' / 'active' / 'fashion_mnist.yaml'}"]
    config, settings = loop._parse(args)
    assert config.model.class_path.endswith("DualHeadDistillation")
    assert settings.strategies == ["random", "entropy", "coreset", "badge", "pcoreset"]
    config, settings = loop._parse(args + settings.fast)
    assert settings.rounds == 2 and config.trainer.max_epochs == 1


# ---- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_kdzoo_active_run_every_strategy(tmp_path: Path, teacher_ckpt: Path) -> None:
    strategies = ["random", "entropy", "coreset", "badge", "pcoreset"]
    config = write_config(tmp_path, teacher=str(teacher_ckpt), strategies=strategies)
    # The Digits teacher of cli_helpers sees 32 x 32 images.
    data = ["--data.init_args.image_size=32"]
    kdzoo("active", "run", "-c", str(config), "--out", "out", *data, cwd=tmp_path)
    out = tmp_path / "out"
    rounds = read_csv(out / "rounds.csv")
    assert len(rounds) == 10 and {r["n_labelled"] for r in rounds} == {"10", "20"}
    # Round 0 is the same experiment for every strategy: same seed, same initial labels.
    assert len({r["test_top1"] for r in rounds if r["round"] == "0"}) == 1
    selected = read_csv(out / "selected.csv")
    assert len(selected) == 5 * 2 * 10
    table = (out / "active.md").read_text()
    assert all(f"| {s} |" in table for s in ("random", "entropy", "coreset", "badge", "pcoreset"))
    assert (out / "active.png").stat().st_size > 0
    (out / "active.md").unlink()
    main(["active", "render", "--out", str(out), "--title", "kdzoo active active"])
    assert (out / "active.md").read_text() == table


@pytest.mark.slow
def test_ddp_selection_equals_one_process(tmp_path: Path) -> None:
    """Two CPU processes, no training steps (both runs keep the seeded initial weights), odd
    pools (padded shards): the gathered pool outputs must give the one-process picks."""
    config = write_config(tmp_path, strategies=["pcoreset"])
    common = ["-c", str(config), "--data.init_args.train_subset=121",
              "--trainer.limit_train_batches=0"]  # fmt: skip
    kdzoo("active", "run", *common, "--out", "one", cwd=tmp_path)
    kdzoo("active", "run", *common, "--out", "two", "--trainer.devices=2",
          "--trainer.strategy=ddp", cwd=tmp_path)  # fmt: skip
    one, two = (read_csv(tmp_path / d / "selected.csv") for d in ("one", "two"))
    assert len(one) == 20 and one == two
