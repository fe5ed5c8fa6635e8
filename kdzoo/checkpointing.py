"""Checkpoints that resume a run exactly: the last state always saved, written atomically, with
every rank's random state.

:class:`KDModelCheckpoint` is Lightning's
:class:`~lightning.pytorch.callbacks.ModelCheckpoint` (the best-by-monitor checkpoints are
unchanged) with three additions:

- ``last.ckpt`` is rewritten at the end of every training epoch (after that epoch's validation)
  and when training stops cleanly (``max_epochs``/``max_steps`` reached, ``trainer.should_stop``
  set by early stopping or the model). Lightning 2.6 rewrites it only together with a new top-k
  checkpoint, so once the monitored metric stopped improving ``last.ckpt`` kept an old epoch, the
  final weights were saved nowhere, and ``--ckpt_path last`` silently trained epochs again.
- Every checkpoint is written by :class:`AtomicCheckpointIO`: to a temporary file in the target
  directory, flushed and fsynced, then renamed over the final name. A full disk or a crash leaves
  the previous file intact, never a truncated one (Lightning writes through a temporary file in
  ``$TMPDIR``, then *copies* it over the target when that is another file system).
- The checkpoint holds the global random state (torch CPU and CUDA, numpy, ``random``) of every
  rank: under DDP each rank's state is gathered into rank 0's checkpoint, and each rank restores
  its own at the start of the first training batch or epoch after resuming (not when the
  checkpoint is loaded: Lightning's sanity check and data setup happen in between).
- On SLURM with auto-requeue, Lightning saves ``hpc_ckpt_N.ckpt`` from inside its SIGUSR1 handler,
  wherever the signal lands (mid-step: possibly after the optimiser step but before the step is
  counted). The callback holds the signal until the end of the current training batch (under DDP
  the ranks agree on that batch) and then runs Lightning's handler (save, ``scontrol requeue``),
  so the checkpoint is a consistent state the requeued job continues from exactly.

With the data loaders of :mod:`kdzoo.datamodules.base`, whose shuffle order and augmentation of
epoch ``e`` are functions of the loader's seed and ``e`` only, a run resumed from ``last.ckpt``
ends bit-identical (on CPU) to the run that was never interrupted; resumed from a checkpoint saved
inside an epoch (``hpc_ckpt_N.ckpt``), the training loaders leave out the batches already trained
(:func:`kdzoo.datamodules.loading.training_position`) and the run ends bit-identical too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import secrets
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose
from lightning.pytorch.trainer.states import TrainerFn

from kdzoo.errors import ConfigError, KDZooError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "KDModelCheckpoint",
    "atomic_torch_save",
    "get_rng_state",
    "set_rng_state",
]


class CheckpointWriteError(KDZooError, OSError):
    """A checkpoint could not be written (disk full, no permission, ...)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The data go to a temporary file beside ``path``, are flushed and fsynced, and the file is then
    renamed onto ``path`` (atomic within one file system); the directory is fsynced so the rename
    survives a crash too. On failure the temporary file is removed and ``path`` is untouched.

    Raises:
        CheckpointWriteError: naming ``path`` and the cause, when writing fails with an OSError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name unique to this process, opened exclusively: created with the usual
    # permissions (0o666 minus the umask), unlike tempfile.mkstemp's 0o600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        cause = _os_error(err)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        if cause.errno == errno.ENOSPC:
            reason += f" (free some space on the disk of {path.parent})"
        raise CheckpointWriteError(
            cause.errno, f"could not write checkpoint {path}: {reason}; the previous "
            "file of that name, if any, is unchanged"
        ) from err  # fmt: skip
    _fsync_directory(path.parent)


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: torch's zip writer turns a failed write into a RuntimeError
    ("unexpected pos") when it then tries to finish the file."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform where directories cannot be opened
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_torch_save` for local paths.

    Remote paths (``s3://``, ...) keep Lightning's own upload.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def use_atomic_writes(strategy: Any) -> None:
    """Make ``strategy`` write checkpoints with :class:`AtomicCheckpointIO`.

    Only Lightning's default file writer is replaced (also inside a wrapper such as
    ``AsyncCheckpointIO``); a checkpoint IO plugin chosen by the user is kept as it is.
    """
    io: CheckpointIO = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(io, _WrappingCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:
        io.checkpoint_io = AtomicCheckpointIO()


# -- random state ----------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """This process's global random state, as tensors and plain containers only.

    So a checkpoint holding it still loads with ``torch.load(weights_only=True)`` (numpy's
    legacy state is a tuple with an ``ndarray``, which that refuses).
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _all_ranks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """``state`` of every rank, in rank order (this process's only, without a process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


# -- the callback ----------------------------------------------------------------------------------


#: ``--checkpoint.monitor`` default: the metric the method declares.
AUTO_MONITOR = "auto"


class KDModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that always keeps ``last.ckpt`` current, writes atomically and saves
    every rank's random state (see the module docstring). Its arguments are Lightning's."""

    # Global step of the newest last.ckpt written by this run (0: none; Lightning saves nothing
    # before the first optimiser step either).
    _last_ckpt_step: int = 0
    # Every rank's random state read from a checkpoint, until the first training batch or epoch.
    _rng_to_restore: list[dict[str, Any]] | None = None
    # (signal, Lightning's handler) while the SLURM requeue signal is held; whether it arrived.
    _requeue: tuple[int, Any] | None = None
    _requeue_pending: bool = False

    @property
    def state_key(self) -> str:
        # Lightning's own key ("ModelCheckpoint{...}"): checkpoints written with Lightning's class
        # resume into this one, and tools reading the state (kdzoo hub export) find it.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def __init__(self, monitor: str | None = None, mode: str = "max", **kwargs: Any) -> None:
        """Lightning's ``ModelCheckpoint``, where ``monitor="auto"`` (kdzoo's default) stands for
        the metric the method declares (``checkpoint_metric`` of
        :class:`~kdzoo.methods.module.KDZooModule`, e.g. ``val/top1`` or ``val/miou``) and its
        mode (``checkpoint_mode``), replacing ``mode``.

        Args:
            monitor: quantity to monitor; ``"auto"``: the method's; ``None``: only ``last``.
            mode: ``"max"`` or ``"min"`` for an explicit ``monitor``.
            **kwargs: see ``lightning.pytorch.callbacks.ModelCheckpoint``.
        """
        self._auto_monitor = monitor == AUTO_MONITOR
        super().__init__(monitor=None if self._auto_monitor else monitor, mode=mode, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._auto_monitor:
            self._monitor_what(pl_module)
        super().setup(trainer, pl_module, stage)
        use_atomic_writes(trainer.strategy)

    def _monitor_what(self, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "checkpoint_metric"):
            raise ConfigError(
                f"checkpoint.monitor is 'auto' but {type(pl_module).__name__} declares no "
                "checkpoint_metric: set --checkpoint.monitor (and --checkpoint.mode)"
            )
        # None: the method has no metric to select by (only last.ckpt is kept).
        self.monitor, mode = pl_module.checkpoint_metric, pl_module.checkpoint_mode
        if self.monitor is not None:
            self.mode = mode
            self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)

    # -- last.ckpt at the end of every epoch and on a clean stop -----------------------------------

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the epoch's validation, so the checkpoint holds the epoch's complete state.
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_behind(trainer)
        if self._requeue_requested(trainer):
            self._requeue_now()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_ckpt_step = trainer.global_step

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if (
            not self.save_last
            or self._last_ckpt_step == trainer.global_step
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        if self.save_last == "link":
            # A link would point at the newest top-k file, which is older: write a real file.
            self._last_checkpoint_saved = ""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- random state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is saved (only rank 0's dict is written).
        return {**super().state_dict(), "rng_states": _all_ranks(get_rng_state())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rng_to_restore = state_dict.get("rng_states")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_rng(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A run resumed inside an epoch gets no on_train_epoch_start.
        self._restore_rng(trainer)

    def _restore_rng(self, trainer: L.Trainer) -> None:
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        if len(states) != trainer.world_size:
            warnings.warn(
                f"the checkpoint holds the random state of {len(states)} processes, this run "
                f"has {trainer.world_size}: random state not restored, so the resumed run will "
                "not repeat the uninterrupted one exactly",
                stacklevel=2,
            )
            return
        set_rng_state(states[trainer.global_rank])

    # -- SLURM requeue signal, acted on at the end of a batch -----------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning's connector is the only place that knows the environment Lightning chose.
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal):
            return
        handler = signal.getsignal(env.requeue_signal)
        if isinstance(handler, _HandlersCompose) and threading.current_thread() is (
            threading.main_thread()
        ):
            self._requeue = (env.requeue_signal, handler)
            signal.signal(env.requeue_signal, self._hold_requeue_signal)

    def _hold_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_pending = True

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # After the epoch's last batch, wait for its end (validation, last.ckpt): the requeued
        # job then starts the next epoch rather than an empty rest of this one.
        if (
            self._requeue_requested(trainer)
            and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ):
            self._requeue_now()

    def _requeue_requested(self, trainer: L.Trainer) -> bool:
        if self._requeue is None:
            return False
        if trainer.world_size > 1:  # every rank acts on the same batch (a collective)
            return trainer.strategy.reduce_boolean_decision(self._requeue_pending, all=False)
        return self._requeue_pending

    def _requeue_now(self) -> None:
        """Lightning's own handler: save ``hpc_ckpt_N.ckpt``, then ``scontrol requeue``."""
        assert self._requeue is not None
        signum, handler = self._requeue
        self._requeue_pending = False
        handler(signum, None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._requeue is not None and threading.current_thread() is threading.main_thread():
            signal.signal(*self._requeue)
        self._requeue, self._requeue_pending = None, False
