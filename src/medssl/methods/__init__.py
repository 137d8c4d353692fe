"""SSL methods: one file per method, registered by name in ``REGISTRY``."""

from medssl.methods import (  # noqa: F401  (registration side effects)
    byol,
    dino,
    ibot,
    mocov3,
    random_init,
    rotnet,
    simclr,
    simmim,
    smit,
    swinunetr_ssl,
)
from medssl.methods.base import FAMILIES, REGISTRY, SSLMethod, build_method, register

__all__ = ["FAMILIES", "REGISTRY", "SSLMethod", "build_method", "register"]
