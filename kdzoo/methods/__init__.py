"""One LightningModule per method; ``--model NAME`` picks one of these."""

from kdzoo.methods.base import ClassificationModule, DistillationModule
from kdzoo.methods.dist import DIST
from kdzoo.methods.dkd import DKD
from kdzoo.methods.kc import KnowledgeConcentration
from kdzoo.methods.kd import KD
from kdzoo.methods.mcmi import MCMITeacher
from kdzoo.methods.nd import ND
from kdzoo.methods.pld import PLD
from kdzoo.methods.supervised import Supervised
from kdzoo.methods.tgeo import TGeoKD

__all__ = [
    "DIST",
    "DKD",
    "KD",
    "ND",
    "PLD",
    "ClassificationModule",
    "DistillationModule",
    "KnowledgeConcentration",
    "MCMITeacher",
    "Supervised",
    "TGeoKD",
]
