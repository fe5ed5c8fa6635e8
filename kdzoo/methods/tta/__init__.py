"""Continual test-time adaptation methods, run by ``kdzoo test`` over a corruption stream."""

from kdzoo.methods.tta.base import TTAModule
from kdzoo.methods.tta.bn_adapt import BNAdapt
from kdzoo.methods.tta.cotta import CoTTA
from kdzoo.methods.tta.mean_teacher import MeanTeacher
from kdzoo.methods.tta.psmt import PSMT
from kdzoo.methods.tta.rmt import RMT
from kdzoo.methods.tta.source import Source
from kdzoo.methods.tta.tent import Tent

__all__ = ["PSMT", "RMT", "BNAdapt", "CoTTA", "MeanTeacher", "Source", "TTAModule", "Tent"]
