"""One LightningModule per method; ``--model NAME`` picks one of these."""

from kdzoo.methods.base import ClassificationModule, DistillationModule
from kdzoo.methods.kd import KD
from kdzoo.methods.supervised import Supervised

__all__ = ["KD", "ClassificationModule", "DistillationModule", "Supervised"]
