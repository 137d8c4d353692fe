"""The random-init baseline: no pretraining, the encoder as initialised from the seed."""

from __future__ import annotations

from medssl.config import RANDOM_INIT
from medssl.methods.base import SSLMethod, register


@register
class RandomInit(SSLMethod):
    name = RANDOM_INIT
    family = "none"
    description = "Random initialisation (no pretraining): the baseline every table includes."
    trains = False
