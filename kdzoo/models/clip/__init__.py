"""CLIP teachers for vision-language distillation: zero-shot and few-shot linear probe (CLAP).

Both are kdzoo :class:`~kdzoo.models.teacher.Teacher` s over a frozen :mod:`open_clip` image
encoder (optional extra: ``pip install 'kdzoo[clip]'``): in eval mode for ever, run without
autograd, never in a checkpoint; they take the *student's* batch and return class logits at a
fixed scale:

* :class:`CLIPZeroShotTeacher`: ``z_c = s * <v(x) / |v(x)|, w_c>``, where ``w_c`` is the
  L2-normalised mean over prompt templates of the **un-normalised** text embeddings of class
  ``c`` and ``s = 100``, not the model's own ``logit_scale`` (a randomly initialised model's is
  ``1 / 0.07 = 14.29``).
* :class:`LinearProbeTeacher` (CLAP, Silva-Rodríguez et al., "A Closer Look at the Few-Shot
  Adaptation of Large Vision-Language Models", CVPR 2024, arXiv:2312.12730): the text weights
  are replaced by prototypes ``P`` fitted on the labelled images by :func:`fit_linear_probe`,
  ``z_c = s * <v / |v|, P_c / |P_c|>``.

As used by PCoreSet / ActiveKD (Kang et al., "PCoreSet: Effective Active Learning through
Knowledge Distillation from Vision-Language Models", arXiv:2506.00910; official code
github.com/erjui/PCoreSet, ``train_active_others.py: clip_classifier`` and ``clap_others.py``),
whose teacher is OpenAI CLIP RN50.

Where this follows the official code: the prompt ensembling (mean of un-normalised embeddings,
then normalised), the fixed scale 100, the CLAP loss ``CE + mean_c lambda_c |P_c - W0_c|^2`` with
``lambda_c`` the zero-shot probability of the true class averaged over class ``c``'s labelled
images (0 for a class without any), SGD (lr 0.01, momentum 0.9) on ``P`` only with a 10 % linear
warm-up then linear decay, batches of 64 drawn with replacement, ``300 |L| / 64`` steps by default,
last iterate kept. Where it simplifies: the image features for the probe are computed once,
without CLAP's own RandomResizedCrop/flip augmentation (the encoder is frozen, so this turns the
fit into a few milliseconds of matrix products); the CLAP logits use the fixed scale of the spec
(100) rather than the model's ``logit_scale.exp()`` (the two agree for pretrained OpenAI CLIP).
The student's batch is mapped to CLIP's input by undoing the student's normalisation, replicating
a grey channel to RGB, a bicubic resize of the shortest side plus centre crop to CLIP's input size,
and CLIP's mean/std; the reference instead feeds CLIP the same 224-pixel crop the student sees.

The files, each importing only those listed before it: :mod:`~kdzoo.models.clip.prompts`
(prompt checks, ensembled text embeddings), :mod:`~kdzoo.models.clip.zero_shot` (the frozen
zero-shot classifier and CLIP's input mapping), :mod:`~kdzoo.models.clip.probe` (CLAP and its
fit), :mod:`~kdzoo.models.clip.teacher` (the config, :class:`CLIPTeacherSpec`, and the builder).
"""

from kdzoo.models.clip.probe import LinearProbeTeacher, fit_linear_probe, linear_warmup_decay
from kdzoo.models.clip.teacher import CLIPTeacherSpec, build_clip_teacher, check_clip_weights
from kdzoo.models.clip.zero_shot import CLIP_MEAN, CLIP_STD, CLIPZeroShotTeacher

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPTeacherSpec",
    "CLIPZeroShotTeacher",
    "LinearProbeTeacher",
    "build_clip_teacher",
    "check_clip_weights",
    "fit_linear_probe",
    "linear_warmup_decay",
]
