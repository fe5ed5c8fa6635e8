"""One LightningModule per method; ``--model NAME`` picks one of these (classification
distillation methods, and the test-time adaptation methods of :mod:`kdzoo.methods.tta`)."""

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
from kdzoo.methods.tta import PSMT, RMT, BNAdapt, CoTTA, MeanTeacher, Source, Tent, TTAModule

__all__ = [
    "DIST",
    "DKD",
    "KD",
    "ND",
    "PLD",
    "PSMT",
    "RMT",
    "BNAdapt",
    "ClassificationModule",
    "CoTTA",
    "DistillationModule",
    "KnowledgeConcentration",
    "MCMITeacher",
    "MeanTeacher",
    "Source",
    "Supervised",
    "TGeoKD",
    "TTAModule",
    "Tent",
]
