"""Pure loss functions ``<name>_loss(student, teacher, ..., *, hyper_parameters)``, a file each."""

from kdzoo.losses.functional.kd import kd_loss

__all__ = ["kd_loss"]
