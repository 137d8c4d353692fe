"""The two-view base of SimCLR, MoCo v3 and BYOL: views, projected encoder, momentum branch.

A two-view method sees a positive pair of views per sample. This module holds what the three share,
so that each method file holds its recipe only:

* the view options (:class:`TwoCropParams`) and pipeline (:meth:`TwoCropMethod.make_views`): two
  random resized crops of one region, each flipped and grey-level augmented with its own options
  (view 1 and view 2 may differ: BYOL's and MoCo v3's blur / solarisation asymmetry);
* :meth:`TwoCropMethod.encode`: the encoder run once over both views (the Swin has no batch
  statistics, so this equals two passes);
* :func:`projection_head`: the projector MLP of the pooled bottleneck, built from the ``proj_*`` options;
* :class:`ProjectedEncoder`: encoder + pooled bottleneck + projector, the branch an EMA teacher
  copies, and :class:`MomentumTwoCropMethod`, the online/EMA pair of MoCo v3 (momentum encoder)
  and BYOL (target network), declared once as the base class's ``momentum_pairs()``, with their heads
  (projector and predictor) and their step (each method supplies its symmetric loss, ``pair_loss``).

The grey-level augmentation options (:class:`IntensityAugmentParams`) are RotNet's too. SwinUNETR-SSL
also sees two views, but of one crop taken twice (its own module).
"""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple, Protocol

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.data.views import enlarged_region_side, intensity_augment, random_flip, two_crops
from medssl.methods.base import EMATeacher, UnmaskedMethod
from medssl.models.encoder import SwinEncoder, global_pool
from medssl.models.heads import MLPHead


class IntensityAugmentParams(StrictModel):
    """Grey-level augmentation of one view (the 3D stand-in for colour jitter, blur and solarisation)."""

    scale_prob: float = Field(0.8, ge=0.0, le=1.0, description="probability of an intensity scaling")
    scale_factor: float = Field(0.1, ge=0.0, description="scaling by 1 + U(-f, f)")
    shift_prob: float = Field(0.8, ge=0.0, le=1.0, description="probability of an intensity shift")
    shift_offset: float = Field(0.1, ge=0.0, description="shift by U(-o, o) (intensities ~[0, 1])")
    noise_prob: float = Field(0.2, ge=0.0, le=1.0, description="probability of Gaussian noise")
    noise_std: float = Field(0.05, ge=0.0, description="largest noise standard deviation")
    blur_prob: float = Field(0.2, ge=0.0, le=1.0, description="probability of a 3D Gaussian blur")
    blur_sigma: tuple[float, float] = Field((0.5, 1.0), description="blur sigma range, voxels")
    solarize_prob: float = Field(0.0, ge=0.0, le=1.0, description="probability of solarisation (x >= 0.5 -> 1 - x)")


def asymmetric_augment() -> tuple[IntensityAugmentParams, IntensityAugmentParams]:
    """BYOL's view asymmetry (Grill et al. 2020, table 6), which MoCo v3's ``main_moco.py``
    ``augmentation1`` / ``augmentation2`` copies: blur with p 1.0 / 0.1, solarisation p 0.0 / 0.2."""
    return (
        IntensityAugmentParams(blur_prob=1.0, solarize_prob=0.0),
        IntensityAugmentParams(blur_prob=0.1, solarize_prob=0.2),
    )


class TwoCropParams(StrictModel):
    """Options of the two-crop views of SimCLR, MoCo v3 and BYOL."""

    region_scale: float = Field(1.25, ge=1.0, description="region side / crop side (rounded up to 16)")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="fraction of the region's volume a crop covers")
    crop_ratio: tuple[float, float] | None = Field(
        (3.0 / 4.0, 4.0 / 3.0), description="range of a crop's side ratios Y/X and Z/X; null keeps the region's"
    )
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="flip probability per spatial axis")
    augment: tuple[IntensityAugmentParams, IntensityAugmentParams] = Field(
        default_factory=lambda: (IntensityAugmentParams(), IntensityAugmentParams()),
        description="grey-level augmentation of view 1 and of view 2",
    )

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("crop_scale must satisfy 0 < lo <= hi <= 1")
        return v

    @field_validator("crop_ratio")
    @classmethod
    def _valid_ratio(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 < v[0] <= v[1]:
            raise ValueError("crop_ratio must satisfy 0 < lo <= hi")
        return v


class ProjectorOptions(Protocol):
    """The projector options of SimCLR, MoCo v3 and BYOL (each with its own defaults)."""

    @property
    def proj_hidden_dim(self) -> int: ...

    @property
    def proj_dim(self) -> int: ...

    @property
    def proj_layers(self) -> int: ...


def projection_head(in_dim: int, options: ProjectorOptions, last_batch_norm: bool | Literal["scale"]) -> MLPHead:
    """The projector of the pooled bottleneck (``in_dim`` channels): ``proj_layers`` linear layers, ``proj_hidden_dim``
    wide, to ``proj_dim``, BatchNorm on the hidden layers; ``last_batch_norm`` as :class:`MLPHead`'s."""
    return MLPHead(
        in_dim, options.proj_hidden_dim, options.proj_dim, n_layers=options.proj_layers, last_batch_norm=last_batch_norm
    )


class ProjectedEncoder(nn.Module):
    """Encoder -> pooled bottleneck -> projector: the branch that MoCo v3 and BYOL copy as EMA teacher.

    ``forward(views)`` runs the encoder once on the concatenated views and the projector on each
    view separately, so its BatchNorm normalises per view as in the MoCo v3 (``moco/builder.py``
    ``MoCo.forward``) and BYOL code. Returns the pooled features (all views) and one projection per view.
    """

    def __init__(self, encoder: SwinEncoder, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, views: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        sizes = [v.shape[0] for v in views]
        pooled = global_pool(self.encoder(torch.cat(views, dim=0))[-1])
        return pooled, [self.projector(chunk) for chunk in torch.split(pooled, sizes, dim=0)]


class TwoCropMethod(UnmaskedMethod):
    """Base of the two-view methods. Subclasses define ``Params``, ``build_heads`` and ``forward``."""

    Params: ClassVar[type[StrictModel]] = TwoCropParams

    def region_size(self, crop_size: int) -> int:
        return enlarged_region_side(crop_size, self.params.region_scale)

    def make_views(self, region: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        """The positive pair: two random resized crops, each flipped and augmented with its view's options."""
        p = self.params
        crops = two_crops(region, self.crop_size, rng, p.crop_scale, p.crop_ratio)
        return {
            f"view{i}": intensity_augment(random_flip(crop, rng, p.flip_prob), rng, **augment.model_dump())
            for i, (crop, augment) in enumerate(zip(crops, p.augment, strict=True), start=1)
        }

    def encode(self, views: list[Tensor]) -> Tensor:
        """Bottleneck feature map of the concatenated views (one encoder pass)."""
        return self.encoder(torch.cat(views, dim=0))[-1]


class PairBranches(NamedTuple):
    """Outputs of the online and the EMA branch over the two views (index 0: view 1, 1: view 2)."""

    pooled: Tensor  # online pooled bottleneck, both views
    projections: list[Tensor]  # online projector outputs
    predictions: list[Tensor]  # online predictor outputs
    targets: list[Tensor]  # EMA projector outputs (no gradient)


class MomentumTwoCropParams(TwoCropParams):
    """Options shared by MoCo v3 and BYOL (each sets its own projector depth and momentum)."""

    augment: tuple[IntensityAugmentParams, IntensityAugmentParams] = Field(
        default_factory=asymmetric_augment, description="grey-level augmentation of view 1 and of view 2"
    )
    proj_hidden_dim: int = Field(4096, ge=1, description="projector hidden width")
    proj_dim: int = Field(256, ge=1, description="projector / predictor output width")
    proj_layers: int = Field(2, ge=1, description="linear layers in the projector")
    pred_hidden_dim: int = Field(4096, ge=1, description="predictor hidden width")
    pred_layers: int = Field(2, ge=1, description="linear layers in the predictor")
    base_momentum: float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at step 0 (-> 1)")


class MomentumTwoCropMethod(TwoCropMethod):
    """MoCo v3 and BYOL: online encoder + projector + predictor against an EMA copy of encoder + projector.

    ``build_heads`` builds the projector (:func:`projection_head`) and the predictor (``pred_layers`` linear
    layers, ``pred_hidden_dim`` wide, ``proj_dim`` -> ``proj_dim``); :meth:`last_batch_norms` says whether each
    ends in a BatchNorm. The EMA branch is an :class:`~medssl.methods.base.EMATeacher` of encoder + projector
    whose BatchNorm layers use batch statistics in training (MoCo v3's momentum encoder and BYOL's target run in
    train mode), updated after every step by the base class at ``params.base_momentum`` -> 1 (cosine over global
    steps). ``forward`` runs both branches over both views and asks the subclass for its symmetric loss
    (:meth:`pair_loss`), reported under :attr:`loss_name`.
    """

    projector: nn.Module
    predictor: nn.Module
    loss_name: ClassVar[str]  # the output key of the pair loss

    params: MomentumTwoCropParams

    def build_heads(self) -> None:
        p = self.params
        projector_norm, predictor_norm = self.last_batch_norms()
        self.projector = projection_head(self.encoder.out_channels, p, last_batch_norm=projector_norm)
        self.predictor = MLPHead(
            p.proj_dim, p.pred_hidden_dim, p.proj_dim, n_layers=p.pred_layers, last_batch_norm=predictor_norm
        )

    def last_batch_norms(self) -> tuple[bool, bool]:
        """Whether the projector and the predictor end in a BatchNorm without affine parameters (BYOL: neither)."""
        return False, False

    def set_up(self) -> None:
        super().set_up()
        self.teacher = EMATeacher(self.online(), batch_norm_batch_stats=True)  # never trained by gradients
        self.init_momentum(self.params.base_momentum)

    def online(self) -> ProjectedEncoder:
        # Built on demand so the encoder is registered once (under ``encoder.``) in the state dict.
        return ProjectedEncoder(self.encoder, self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, EMATeacher]]:
        return [(self.online(), self.teacher)]

    def branches(self, batch: dict[str, Tensor]) -> PairBranches:
        views = [batch["view1"], batch["view2"]]
        pooled, projections = self.online()(views)
        _, targets = self.teacher(views)
        return PairBranches(pooled, projections, [self.predictor(z) for z in projections], targets)

    def pair_loss(self, predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
        """The method's symmetric loss: each view's online prediction against the other view's EMA target."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        out = self.branches(batch)
        loss = self.pair_loss(out.predictions, out.targets)
        return self.outputs(
            loss,
            embedding=torch.cat(out.projections),
            features=out.pooled,
            momentum=loss.new_tensor(self.momentum(step)),
            **{self.loss_name: loss},
        )
