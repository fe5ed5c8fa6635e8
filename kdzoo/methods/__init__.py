"""One LightningModule per method; ``--model NAME`` picks one of these (classification
distillation methods, the test-time adaptation methods of :mod:`kdzoo.methods.tta` and the
segmentation methods of :mod:`kdzoo.methods.segmentation`)."""

from kdzoo.methods.base import ClassificationModule, DistillationModule
from kdzoo.methods.crossmodal import CrossModalKD, MSTDistill, PairedSupervised
from kdzoo.methods.dho import DualHeadDistillation
from kdzoo.methods.dist import DIST
from kdzoo.methods.dkd import DKD
from kdzoo.methods.kc import KnowledgeConcentration
from kdzoo.methods.kd import KD
from kdzoo.methods.mcmi import MCMITeacher
from kdzoo.methods.nd import ND
from kdzoo.methods.pld import PLD
from kdzoo.methods.segmentation import FST, LADTeacher, SegKD, SegSupervised
from kdzoo.methods.supervised import Supervised
from kdzoo.methods.tgeo import TGeoKD
from kdzoo.methods.tta import PSMT, RMT, BNAdapt, CoTTA, MeanTeacher, Source, Tent, TTAModule

__all__ = [
    "DIST",
    "DKD",
    "FST",
    "KD",
    "ND",
    "PLD",
    "PSMT",
    "RMT",
    "BNAdapt",
    "ClassificationModule",
    "CoTTA",
    "CrossModalKD",
    "DistillationModule",
    "DualHeadDistillation",
    "KnowledgeConcentration",
    "LADTeacher",
    "MCMITeacher",
    "MSTDistill",
    "MeanTeacher",
    "PairedSupervised",
    "SegKD",
    "SegSupervised",
    "Source",
    "Supervised",
    "TGeoKD",
    "TTAModule",
    "Tent",
]
