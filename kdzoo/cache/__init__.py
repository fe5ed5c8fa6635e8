"""Teacher-output caches: distil from stored teacher outputs exactly as from the live teacher.

``kdzoo cache build`` runs a run's teacher over E epochs of its exact-replay training views
(``--data.init_args.augment_seed``) and stores its outputs (:mod:`kdzoo.cache.build`);
``--model.init_args.teacher.cache DIR`` trains from them (:class:`CachedTeacher`), refusing a
cache built for another teacher, data, transforms, seed or fewer epochs; ``kdzoo cache verify``
and ``kdzoo cache info`` check and describe one (:mod:`kdzoo.cache.report`). The teachers that
can be cached are the timm classifiers of the classification methods and the cross-modal teacher
of CrossModalKD on paired-modality data (:mod:`kdzoo.cache.adapters`).
"""

from kdzoo.cache.store import CacheError
from kdzoo.cache.teacher import CachedTeacher, open_manifest

__all__ = ["CacheError", "CachedTeacher", "open_manifest"]
