"""BYOL (Grill et al. 2020) in 3D.

Reference: google-deepmind/deepmind-research ``byol/byol_experiment.py`` (``_forward``, ``loss_fn``),
``byol/utils/helpers.py`` (``regression_loss``) and ``byol/utils/augmentations.py`` (``augment_config``:
view1 blur p 1.0, solarise p 0.0; view2 blur p 0.1, solarise p 0.2). Two augmented crops with that
asymmetry (a 3D Gaussian blur; solarisation inverts normalised intensities >= 0.5). Online branch: encoder
-> projector (2 layers, 4096 -> 256, BatchNorm on the hidden layer) -> predictor (2 layers, 4096 -> 256).
Target branch: an EMA copy of encoder + projector, momentum 0.996 -> 1 on a cosine over the global steps.
Loss: the normalised MSE ``2 - 2 cos(p, z')`` of each view's prediction against the other view's target
projection, summed over both directions. No negatives, so nothing is gathered.
3D departures (config fields): as :class:`~medssl.methods.two_crop.TwoCropParams`.
Departure: the release initialises online and target networks from different random keys
(``_make_initial_state``: ``rng_online, rng_target``; its comment reports no significant difference from one
key); medssl's target starts as a copy of the online network (``EMATeacher``).
"""

from __future__ import annotations

from torch import Tensor

from medssl.methods.base import register
from medssl.methods.losses import byol_loss
from medssl.methods.two_crop import MomentumTwoCropMethod, MomentumTwoCropParams


class BYOLParams(MomentumTwoCropParams):
    """BYOL's options are the shared defaults: a 2-layer projector, target momentum 0.996 -> 1."""


@register
class BYOL(MomentumTwoCropMethod):
    name = "byol"
    family = "contrastive"
    description = "BYOL: online encoder + projector + predictor regresses an EMA target, 2 - 2cos symmetric."
    Params = BYOLParams
    loss_name = "byol"

    params: BYOLParams

    def pair_loss(self, predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
        (p1, p2), (t1, t2) = predictions, targets
        return byol_loss(p1, t2) + byol_loss(p2, t1)
