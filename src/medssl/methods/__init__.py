"""SSL methods: one file per method, registered by name in ``REGISTRY``."""

from medssl.methods import random_init, simmim  # noqa: F401  (registration side effects)
from medssl.methods.base import FAMILIES, REGISTRY, SSLMethod, build_method, register

__all__ = ["FAMILIES", "REGISTRY", "SSLMethod", "build_method", "register"]
