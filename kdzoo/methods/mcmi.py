"""MCMI teacher: fine-tune a trained teacher to maximise the conditional mutual information.

Ye, Hamidi, Tan, Yang. "Bayes Conditional Distribution Estimation for Knowledge Distillation"
(also titled "... Based on Conditional Mutual Information"). ICLR 2024, arXiv:2401.08732. Official
code: github.com/iclr2024mcmi/ICLRMCMI (read at ``d12f354``: ``CIFAT-100KD/FineTuneTeacher.py``,
``centroid.py``; the loss class it imports is missing there and was read from
``CIFAR100-FewShot/losses.py``, the working copy: ``ZeroShot/losses.py`` holds the same
``CE_KL_PWCE_loss``, which cannot be constructed there, ``pair_wise_CE`` being undefined).
kdzoo spec: ``specs/classification.md`` section 4.

MCMI changes how the *teacher* is trained; students then use any distillation method unchanged.
The teacher loss is ``CE(z, y) - lambda * I``, with ``I`` the batch mean of ``KL(P_x || Q_y)``
(:func:`~kdzoo.losses.functional.conditional_mutual_information`), ``P_x = softmax(z)`` at
``T = 1`` and ``Q_y`` the class centroid, the mean of ``P_x`` over the training images of class
``y``. The fine-tuned checkpoint holds only ``student.*`` like a :class:`Supervised` run, so it is
the ``teacher.weights`` of any other method.

What follows the code (spec 4.1, 4.4):

* fine-tuning of a CE-trained teacher (``init_weights``), not training from scratch;
* the centroids come from one pass over the **training split with its training augmentation**
  before fine-tuning and are then **kept fixed** (the code's per-batch EMA update is commented
  out): ``centroids="fixed"``. ``"epoch"`` recomputes them at every epoch start (kdzoo's option
  for pitfall 3, the stale centroids);
* that pass runs the network in **train mode** (pitfall 2), so BatchNorm normalises each batch
  with its own statistics and its running statistics move towards the augmented training data
  before fine-tuning starts: ``centroid_pass="train"``. ``"eval"`` runs it in eval mode and leaves
  the network untouched. The rows are normalised to sum to 1, as in the code;
* ``lambda = 0.15`` (``cmi_weight``, the run names' ``CMI_-0.15``); the code's schedule, for the
  configs: 20 epochs, SGD lr 0.05 (0.005 for MobileNetV2 / ShuffleNet teachers), momentum 0.9,
  weight decay 5e-4, cosine annealing over the 20 epochs, batch 64.

Not followed: the code keeps the checkpoint with the best **test** accuracy (pitfall 4); kdzoo
selects on the validation split, like every other run.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.losses.functional.cmi import conditional_mutual_information
from kdzoo.methods.base import ClassificationModule
from kdzoo.methods.statistics import ClassMeans, class_means_on_training_data
from kdzoo.models.teacher import load_weights, resolve_weights
from kdzoo.models.weights import WeightsError

__all__ = ["MCMITeacher"]

# Where the centroids travel in a Lightning checkpoint: outside its state dict, which stays the
# plain student a teacher is loaded from, but there for `fit --ckpt_path` to resume with.
_CHECKPOINT_KEY = "mcmi_centroids"


class MCMITeacher(ClassificationModule):
    """A trained ``student`` (the teacher being built) fine-tuned with ``CE - cmi_weight * CMI``.

    Loss terms ``"ce"`` and ``"cmi"`` with weights ``1`` and ``-cmi_weight`` (CMI is maximised).

    The ``(C, C)`` centroid table is computed by :meth:`compute_centroids` in ``on_fit_start``
    (``centroids="fixed"``) or ``on_train_epoch_start`` (``"epoch"``) and kept in a non-persistent
    buffer, so state dicts hold only the network; checkpoints carry it under their own key, and
    ``fit --ckpt_path`` resumes with it instead of recomputing it from the resumed weights. With
    ``centroid_pass="eval"`` and ``"fixed"`` the table is cached on disk (see
    :mod:`kdzoo.methods.statistics`); a train-mode pass also updates the BatchNorm statistics,
    which a cache hit would skip, and an ``"epoch"`` table comes from new weights every epoch, so
    those are never cached.

    Outside a trainer (a bare :meth:`loss_terms` or ``training_step`` call, as in the contract
    tests) no table exists; then each class's centroid is the mean of the batch's detached
    probabilities of that class (uniform for classes absent from the batch, never used), with a
    warning. Inside a fit, a missing table is a :class:`RuntimeError`.

    Args:
        init_weights: the trained teacher to fine-tune: a kdzoo Lightning checkpoint (its
            student), a ``.safetensors`` export or a ``torch.save``-d state dict of the
            ``student`` architecture. ``None`` starts from ``student``'s random (or timm
            pretrained) initialisation, with a warning: the paper fine-tunes a trained teacher.
        cmi_weight: ``lambda >= 0``; the code's runs mostly use 0.15 (also 0.1, 0.2, 0.25).
        centroids: ``"fixed"``: computed once before fine-tuning (paper and code); ``"epoch"``:
            recomputed at the start of every training epoch.
        centroid_pass: the network's mode in the centroid pass: ``"train"`` (the code) or
            ``"eval"``.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`; ``student`` is the
            teacher's architecture.
    """

    citation = (
        'Ye, Hamidi, Tan, Yang. "Bayes Conditional Distribution Estimation for Knowledge '
        'Distillation". ICLR 2024, arXiv:2401.08732'
    )
    description = "teacher fine-tuned for conditional mutual information"

    def __init__(
        self,
        init_weights: str | None = None,
        cmi_weight: float = 0.15,
        centroids: Literal["fixed", "epoch"] = "fixed",
        centroid_pass: Literal["train", "eval"] = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if cmi_weight < 0:
            raise ConfigError(
                f"cmi_weight must be >= 0, got {cmi_weight}: it is lambda in CE - lambda * CMI "
                "(the paper maximises the conditional mutual information)"
            )
        self.centroid_schedule = centroids
        self.centroid_pass = centroid_pass
        self.loss_weights = {"ce": 1.0, "cmi": -cmi_weight}
        self.register_buffer("class_centroids", torch.empty(0), persistent=False)
        if init_weights is None:
            warnings.warn(
                "MCMITeacher.init_weights is None: fine-tuning starts from the architecture's "
                "initial weights, but MCMI (Ye et al., ICLR 2024) fine-tunes a trained teacher; "
                "pass the checkpoint of a Supervised run as init_weights",
                stacklevel=2,
            )
        else:
            self._load_init_weights(init_weights)

    def _load_init_weights(self, path: str) -> None:
        try:
            weights, trained = resolve_weights(path)  # a file, an exported folder or hub:NAME
            load_weights(self.student, weights)
        except WeightsError as err:
            raise WeightsError(
                f"MCMITeacher.init_weights: {err} (the architecture is set by model.student)"
            ) from err
        for key in ("mean", "std"):
            theirs, ours = trained.get(key), getattr(self, key)
            if theirs is not None and ours is not None and tuple(theirs) != tuple(ours):
                warnings.warn(
                    f"the teacher in {path} was trained with input {key} {tuple(theirs)}, but "
                    f"this run normalises with {tuple(ours)}: fine-tune on the teacher's data",
                    stacklevel=3,
                )

    # ---- the centroids ---------------------------------------------------------------------
    @torch.no_grad()
    def compute_centroids(self) -> torch.Tensor:
        """Fill :attr:`class_centroids` from one pass over the training data; returns it.

        Row ``y`` is the mean softmax (``T = 1``, float32) of the network over the training
        images of class ``y``, with their training augmentation, normalised to sum to 1 (uniform
        for a class without training images). The network runs in ``centroid_pass`` mode and
        every submodule gets its mode back after.
        """
        modes = {module: module.training for module in self.student.modules()}
        self.student.train(self.centroid_pass == "train")
        try:
            table = class_means_on_training_data(
                self.trainer,
                lambda images: self.student(images).logits.float().softmax(dim=1),
                self.hparams.num_classes,
                source=self.student,
                what=f"mcmi-softmax-{self.centroid_pass}",
                cache=self.centroid_pass == "eval" and self.centroid_schedule == "fixed",
            )
        finally:
            for module, mode in modes.items():
                module.training = mode
        # The code's row normalisation; a class absent from the training data has a zero row
        # (never read: it is never a training label) and gets the uniform distribution.
        mass = table.sum(dim=1, keepdim=True)
        uniform = torch.full_like(table, 1.0 / table.shape[1])
        self.class_centroids = torch.where(mass > 0, table / mass, uniform)
        return self.class_centroids

    def on_fit_start(self) -> None:
        resumed = self.trainer.ckpt_path is not None and self.class_centroids.numel() > 0
        if self.centroid_schedule == "fixed" and not resumed:
            self.compute_centroids()

    def on_train_epoch_start(self) -> None:
        if self.centroid_schedule == "epoch":
            self.compute_centroids()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.class_centroids.numel():
            checkpoint[_CHECKPOINT_KEY] = self.class_centroids.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        table = checkpoint.get(_CHECKPOINT_KEY)
        if table is not None:
            self.class_centroids = table.to(self.class_centroids.device)

    # ---- the loss --------------------------------------------------------------------------
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        logits = self.student(images).logits.float()
        probs = logits.softmax(dim=1)
        return {
            "ce": F.cross_entropy(logits, target),
            "cmi": conditional_mutual_information(
                probs, target, self._centroids_for(probs, target)
            ),
        }

    def _centroids_for(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.class_centroids.numel():
            return self.class_centroids
        if self._trainer is not None:
            raise RuntimeError(
                "MCMITeacher has no class centroids: they are computed in on_fit_start "
                "(centroids='fixed') or on_train_epoch_start ('epoch'); call compute_centroids() "
                "first if those hooks were skipped or overridden"
            )
        warnings.warn(
            "MCMITeacher has no class centroids outside a fit; using the in-batch class means of "
            "the probabilities for this step",
            stacklevel=3,
        )
        table = ClassMeans.of_batch(probs.detach(), target, probs.shape[1])
        means = table.means()
        uniform = torch.full_like(means, 1.0 / probs.shape[1])
        return torch.where(table.counts[:, None] > 0, means, uniform)
