"""Pure loss functions ``<name>_loss(student, teacher, ..., *, hyper_parameters)``, a file each."""

from kdzoo.losses.functional.cmi import conditional_mutual_information
from kdzoo.losses.functional.contrastive import rmt_contrastive_loss, supcon_loss
from kdzoo.losses.functional.dist import dist_loss
from kdzoo.losses.functional.dkd import dkd_loss
from kdzoo.losses.functional.entropy import soft_cross_entropy, softmax_entropy
from kdzoo.losses.functional.kc import concentration_loss, concentration_targets
from kdzoo.losses.functional.kd import kd_loss
from kdzoo.losses.functional.mst import (
    mst_cotraining_losses,
    mst_load_balancing_loss,
    mst_mask_loss,
    mst_routed_kd_loss,
)
from kdzoo.losses.functional.nd import nd_loss
from kdzoo.losses.functional.pld import pld_loss
from kdzoo.losses.functional.sce import symmetric_cross_entropy
from kdzoo.losses.functional.segmentation import channel_wise_distillation_loss, pixel_kd_loss
from kdzoo.losses.functional.tgeo import tgeo_loss, tgeo_relations

__all__ = [
    "channel_wise_distillation_loss",
    "concentration_loss",
    "concentration_targets",
    "conditional_mutual_information",
    "dist_loss",
    "dkd_loss",
    "kd_loss",
    "mst_cotraining_losses",
    "mst_load_balancing_loss",
    "mst_mask_loss",
    "mst_routed_kd_loss",
    "nd_loss",
    "pixel_kd_loss",
    "pld_loss",
    "rmt_contrastive_loss",
    "soft_cross_entropy",
    "softmax_entropy",
    "supcon_loss",
    "symmetric_cross_entropy",
    "tgeo_loss",
    "tgeo_relations",
]
