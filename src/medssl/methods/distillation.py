"""The self-distillation layer DINO, iBOT and SMIT share: heads, temperatures, centring, freezing, clipping.

What the three released codes have in common, written once:

* :class:`DistillationHead`: DINO's head (``dino/vision_transformer.py`` ``DINOHead``: MLP
  in -> 2048 -> 2048 -> 256, L2 normalisation, weight-normalised prototypes, ``norm_last_layer``)
  on a global token, optionally with patch tokens in one of the released layouts: iBOT's
  ``models/head.py`` ``iBOTHead`` (``shared``: one head for both, ``shared_mlp``: one MLP and a
  second last layer ``last_layer2``) or SMIT's ``models/Trans.py``
  ``Trans_SMIT_pre_train_Student_No_Share`` (``separate``: two heads), optionally behind SMIT's
  LayerNorm of the distilled tokens;
* :class:`Centering`: the teacher centre and its momentum update (``main_dino.py``
  ``DINOLoss.update_center``), all-reduced across processes; ``centre: false`` switches it off
  (an ablation only: without centring the teacher collapses onto one prototype, which the
  representation-health tests use);
* :class:`DistillationMethod`: the teacher-temperature schedule (linear warm-up then constant,
  ``DINOLoss.teacher_temp_schedule``, per step where DINO indexes it per epoch; a run shorter than the
  warm-up stops mid-warm-up, ``teacher_temp_short_run: truncate``), the EMA momentum (via
  :meth:`SSLMethod.init_momentum`), last-layer freezing during the first epoch
  (``utils.cancel_gradients_last_layer``: every parameter named ``last_layer*``), and per-parameter
  gradient clipping (``utils.clip_gradients``) through the training loop's ``clip_gradients(max_norm)`` hook.

Epochs. The recipes count warm-ups and starts in epochs of their published run (DINO: the teacher
temperature warms up over 30 of 300 epochs); medssl trains by steps. ``epoch_knobs`` says how they convert
(``medssl.schedules``): ``published_fraction`` (the default) keeps each knob's fraction of the published
run, ``epochs / published_epochs`` of this run's steps, so a run of any length and corpus has the
reference's schedule shape (a declared departure from counting passes over this corpus);
``corpus_epochs`` counts passes over this run's corpus, ``steps_per_epoch`` steps each: an explicit value,
or (``null``) ``ceil(corpus volumes / schedule.batch_size)``, which pretraining computes and hands to the
method (``build_method(..., steps_per_epoch=...)``; one step where no corpus is known).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from medssl.config import StrictModel
from medssl.methods.base import EMATeacher, SSLMethod
from medssl.methods.losses import dino_cross_entropy, masked_patch_ce, teacher_probs, update_centre
from medssl.models.heads import DINOHead, prototype_layer
from medssl.schedules import (
    EpochKnobs,
    ShortRunWarmup,
    corpus_epoch_steps,
    held_then_warmed,
    linear_warmup_then_constant,
    published_fraction_steps,
    schedule_at,
)

PatchLayout = Literal["shared", "shared_mlp", "separate"]


def view_major(x: Tensor) -> Tensor:
    """(B, V, ...) -> (V*B, ...) ordered view by view, so ``chunk(V)`` gives one view per chunk."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def feature_tokens(feature: Tensor) -> Tensor:
    """(B, C, d, h, w) encoder output -> its tokens (B, d*h*w, C), in the mask's flattening order."""
    return feature.flatten(2).transpose(1, 2)


def random_token_mask(grid: tuple[int, ...], n_masked: int, rng: np.random.Generator) -> Tensor:
    """Boolean mask over a token grid with exactly ``n_masked`` tokens masked, drawn uniformly."""
    n = int(np.prod(grid))
    flat = np.zeros(n, dtype=bool)
    flat[rng.permutation(n)[: min(max(int(n_masked), 0), n)]] = True
    return torch.from_numpy(flat.reshape(grid))


def token_mask_to_patches(token_mask: Tensor, factor: int, patch_grid: tuple[int, ...]) -> Tensor:
    """A mask over coarse tokens (d, h, w) -> the patch-token mask the encoder takes: each coarse
    token covers ``factor``^3 patches, so a coarse token is masked or visible as a whole."""
    m = token_mask
    for dim in range(3):
        m = m.repeat_interleave(factor, dim=dim)
    return m[: patch_grid[0], : patch_grid[1], : patch_grid[2]].contiguous()


class Centering(nn.Module):
    """The teacher centre ``c`` (a buffer, so it is checkpointed) and its momentum update.

    ``update`` averages the teacher logits over the *global* batch (summed and counted with one
    ``all_reduce`` when ``torch.distributed`` is initialised), so every process holds the same
    centre and a DDP run matches one process on the same global batch. With ``enabled=False``
    the centre stays 0 (the ``centre: false`` ablation).
    """

    centre: Tensor

    def __init__(self, dim: int, momentum: float = 0.9, enabled: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.momentum = momentum
        self.enabled = enabled
        self.register_buffer("centre", torch.zeros(1, dim))

    def probs(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """The centred (when enabled), sharpened teacher distribution."""
        return teacher_probs(teacher_logits, self.centre, temperature)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        if not self.enabled:
            return
        flat = teacher_logits.detach().float().reshape(-1, self.dim)
        packed = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        batch_mean = (packed[:-1] / packed[-1]).unsqueeze(0)
        self.centre.copy_(update_centre(self.centre, batch_mean, self.momentum))


class DistillationParams(StrictModel):
    """Head, temperatures, centring, EMA and epoch length of self-distillation (DINO, iBOT, SMIT)."""

    out_dim: int = Field(8192, ge=2, description="K, number of prototypes")
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    norm_last_layer: bool = Field(True, description="freeze the prototypes' weight-norm gain at 1")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp_start: float = Field(0.04, gt=0, description="tau_t at the first step")
    teacher_temp: float = Field(0.07, gt=0, description="tau_t after the warm-up")
    teacher_temp_warmup_epochs: float = Field(30, ge=0, description="linear tau_t warm-up, published epochs")
    teacher_temp_short_run: ShortRunWarmup = Field(
        "truncate",
        description="a run shorter than the warm-up: truncate (stop mid-warm-up, each step's tau_t as in the "
        "reference) or compress (the whole warm-up squeezed into the run; a departure)",
    )
    centre: bool = Field(True, description="centre the teacher; false is an ablation (collapses)")
    centre_momentum: float = Field(0.9, ge=0.0, le=1.0)
    teacher_momentum: float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at step 0, cosine to 1")
    freeze_last_layer_epochs: float = Field(1, ge=0, description="epochs with frozen prototypes")
    epoch_knobs: EpochKnobs = Field(
        "published_fraction",
        description="epoch counts as the same fraction of this run as of the published run (published_fraction) "
        "or as passes over this run's corpus (corpus_epochs)",
    )
    published_epochs: float = Field(300, gt=0, description="length of the published run the epoch counts refer to")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="corpus_epochs: steps in one epoch; null: ceil(corpus volumes / global batch)"
    )

    def epochs_to_steps(self, epochs: float, total_steps: int, steps_per_epoch: int | None) -> int:
        """An epoch count of the recipe as steps of a run of ``total_steps`` (``epoch_knobs``, module docstring);
        ``steps_per_epoch``: the corpus rule's, used by ``corpus_epochs`` unless this recipe sets its own."""
        if self.epoch_knobs == "published_fraction":
            return published_fraction_steps(epochs, self.published_epochs, total_steps)
        return corpus_epoch_steps(epochs, self.steps_per_epoch or steps_per_epoch or 1)

    def knob_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> dict[str, int]:
        """Every epoch-counted knob of this recipe in steps of a run (the dry run and the run's results show them)."""
        return {
            "teacher_temp_warmup": self.epochs_to_steps(self.teacher_temp_warmup_epochs, total_steps, steps_per_epoch),
            "freeze_last_layer": self.epochs_to_steps(self.freeze_last_layer_epochs, total_steps, steps_per_epoch),
        }


class PatchDistillationParams(StrictModel):
    """The masked-patch term of iBOT and SMIT: its teacher temperature and centre."""

    teacher_patch_temp_start: float = Field(0.04, gt=0, description="patch tau_t while held and at warm-up start")
    teacher_patch_temp: float = Field(0.07, gt=0, description="patch tau_t after the warm-up")
    patch_centre_momentum: float = Field(0.9, ge=0.0, le=1.0)


class DistillationHead(nn.Module):
    """A DINO head on a global token, and patch-token logits in one of the released layouts.

    ``patch=None``: global only (DINO). ``"shared"``: the whole head scores both (iBOT
    ``shared_head=True``); ``"shared_mlp"``: one MLP, patch tokens scored by a second last layer
    ``last_layer2`` (iBOT ``shared_head=False``); ``"separate"``: a second head (SMIT's
    ``_No_Share`` models, its default), on tokens of ``patch_in_dim`` channels when they come from
    another encoder output than the global token (iBOT below 64^3). ``token_norm`` puts SMIT's
    ``LayerNorm(eps=1e-6)`` before both (``Trans_SMIT_pre_train_Student_No_Share.norm``); the global
    token is the mean of the normed tokens.
    """

    def __init__(
        self,
        in_dim: int,
        params: DistillationParams,
        patch: PatchLayout | None = None,
        patch_out_dim: int | None = None,
        token_norm: bool = False,
        patch_in_dim: int | None = None,
    ) -> None:
        super().__init__()
        p = params
        self.patch = patch
        self.norm: nn.Module = nn.LayerNorm(in_dim, eps=1e-6) if token_norm else nn.Identity()
        self.head = DINOHead(in_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers, p.norm_last_layer)
        patch_dim = patch_out_dim or p.out_dim
        if patch == "separate":
            self.patch_head = DINOHead(
                patch_in_dim or in_dim, patch_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers, p.norm_last_layer
            )
        elif patch_in_dim not in (None, in_dim):
            raise ValueError(f"patch tokens of {patch_in_dim} channels need a separate patch head, not {patch!r}")
        if patch == "shared_mlp":
            self.last_layer2 = prototype_layer(p.bottleneck_dim, patch_dim, p.norm_last_layer)

    def global_logits(self, pooled: Tensor) -> Tensor:
        """(N, C) pooled features -> (N, K) (DINO, and the local crops of iBOT)."""
        return self.head(pooled)

    def patch_logits(self, tokens: Tensor, share_last_layer: bool = False) -> Tensor:
        """(N, L, C') patch tokens -> (N, L, K') in this head's layout (``share_last_layer``: see :meth:`forward`)."""
        tokens = self.norm(tokens)
        if self.patch == "separate":
            return self.patch_head(tokens)
        if self.patch == "shared_mlp" and not share_last_layer:
            return self.last_layer2(self.head.code(tokens))
        return self.head(tokens)

    def forward(self, tokens: Tensor, share_last_layer: bool = False) -> tuple[Tensor, Tensor]:
        """(N, L, C) tokens -> global logits (N, K) of their mean and patch logits (N, L, K').

        ``share_last_layer``: score patches with the global prototypes even where this head has
        ``last_layer2`` (iBOT's teacher with ``shared_head_teacher=True``).
        """
        tokens = self.norm(tokens)
        both = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        if self.patch == "separate":
            return self.head(both[:, 0]), self.patch_head(both[:, 1:])
        if self.patch == "shared_mlp" and not share_last_layer:
            code = self.head.code(both)
            return self.head.last_layer(code[:, 0]), self.last_layer2(code[:, 1:])
        logits = self.head(both)
        return logits[:, 0], logits[:, 1:]


class GlobalDistillation(NamedTuple):
    """DINO's global term of one step (:meth:`DistillationMethod.global_term`)."""

    ce: Tensor  # the cross-entropy, averaged over the pairs of different views
    targets: Tensor  # the centred, sharpened teacher distribution of every teacher view (view-major)
    temperature: float  # the teacher temperature of this step


class DistillationMethod(SSLMethod):
    """Base of DINO, iBOT and SMIT: the EMA teachers of the student encoder and of the head the subclass
    builds as ``self.head`` in ``build_heads`` (teachers built without stochastic depth and updated by the
    base class; :meth:`make_teacher` is where SMIT builds its released teacher instead), the global centre,
    schedules, last-layer freezing and per-parameter clipping."""

    params: DistillationParams
    head: DistillationHead
    # Whether the student encoder sees masks: otherwise its mask token gets no gradient and is
    # frozen (a parameter without gradient would stall DDP's reducer).
    masks_student: ClassVar[bool] = False

    def set_up(self) -> None:
        super().set_up()
        params, encoder = self.params, self.encoder
        encoder.mask_token.requires_grad_(self.masks_student)
        self.steps_per_epoch = params.steps_per_epoch or self.steps_per_epoch or 1
        self.knobs = params.knob_steps(self.total_steps, self.steps_per_epoch)
        self.init_momentum(params.teacher_momentum)
        self.teacher_temp_schedule = linear_warmup_then_constant(
            params.teacher_temp_start,
            params.teacher_temp,
            self.epochs_to_steps(params.teacher_temp_warmup_epochs),
            self.total_steps,
            params.teacher_temp_short_run,
        )
        self.freeze_last_layer_steps = self.epochs_to_steps(params.freeze_last_layer_epochs)
        self.teacher_encoder = self.make_teacher(encoder)
        self.teacher_head = self.make_teacher(self.head)
        self.centering = self.make_centering(params.out_dim)

    @classmethod
    def knob_steps(cls, params: Any, total_steps: int, steps_per_epoch: int | None = None) -> dict[str, int]:
        return dict(params.knob_steps(total_steps, steps_per_epoch))

    def make_teacher(self, online: nn.Module) -> EMATeacher:
        """The EMA teacher of ``online``: DINO's copy of the student without stochastic depth."""
        return EMATeacher(online)

    def momentum_pairs(self) -> list[tuple[nn.Module, EMATeacher]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    def epochs_to_steps(self, epochs: float) -> int:
        """An epoch count of the recipe as steps of this run (``epoch_knobs``, module docstring)."""
        return self.params.epochs_to_steps(epochs, self.total_steps, self.steps_per_epoch)

    def make_centering(self, dim: int, momentum: float | None = None) -> Centering:
        p = self.params
        return Centering(dim, p.centre_momentum if momentum is None else momentum, enabled=p.centre)

    def teacher_temperature(self, step: int) -> float:
        return schedule_at(self.teacher_temp_schedule, step)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable prototype parameters (named ``last_layer*``, as ``cancel_gradients_last_layer``)."""
        return [p for name, p in self.named_parameters() if "last_layer" in name and p.requires_grad]

    def cancel_gradients(self, step: int) -> None:
        """Freeze the prototypes during the first epoch(s) by dropping their gradients."""
        if step < self.freeze_last_layer_steps:
            for param in self.last_layer_parameters():
                param.grad = None

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> float | None:
        """DINO's ``utils.clip_gradients``: each parameter's gradient norm clipped to ``max_norm``
        on its own (not the global norm). Returns the global norm before clipping, for the log.

        The reference's arithmetic (``clip_coef = clip / (norm + 1e-6)``, applied when below 1), with
        the norms of all gradients in one ``torch._foreach_norm`` and one transfer to the host instead
        of one per parameter (a device synchronisation each on GPU; issue #10). The coefficient is
        computed in double precision as the per-parameter Python loop did, so the result is unchanged
        (``tests/methods/test_step_overhead.py``)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norms = torch.stack(torch._foreach_norm(grads, 2)).tolist()
        squares = 0.0
        clipped, coefs = [], []
        for grad, norm in zip(grads, norms, strict=True):
            squares += norm * norm
            coef = max_norm / (norm + 1e-6)
            if coef < 1:
                clipped.append(grad)
                coefs.append(coef)
        if clipped:
            torch._foreach_mul_(clipped, coefs)
        return math.sqrt(squares)

    # masked-patch distillation (iBOT, SMIT) -------------------------------------------------
    def init_patch_distillation(self, patch_dim: int, hold_epochs: float) -> None:
        """Patch centre and patch teacher temperature (held ``hold_epochs``, then warmed up over
        ``teacher_temp_warmup_epochs``); ``self.params`` must be :class:`PatchDistillationParams`."""
        p = self.params
        assert isinstance(p, PatchDistillationParams)
        self.patch_centering: Centering = self.make_centering(patch_dim, p.patch_centre_momentum)
        self.patch_temp_schedule: np.ndarray = held_then_warmed(
            p.teacher_patch_temp_start,
            p.teacher_patch_temp,
            self.epochs_to_steps(hold_epochs),
            self.epochs_to_steps(p.teacher_temp_warmup_epochs),
            self.total_steps,
            self.params.teacher_temp_short_run,
        )

    def global_term(
        self, student: list[Tensor], teacher_logits: Tensor, teacher_views: int, step: int
    ) -> GlobalDistillation:
        """DINO's global cross-entropy (``DINOLoss.forward``) between the centred, sharpened distribution of each of
        the ``teacher_views`` views in ``teacher_logits`` (view-major) and the student's logits of every other view
        (``student``: one tensor per view, the teacher's views first), with the centre updated after."""
        temp = self.teacher_temperature(step)
        targets = self.centering.probs(teacher_logits, temp)
        ce = dino_cross_entropy(student, list(targets.chunk(teacher_views)), self.params.student_temp)
        self.centering.update(teacher_logits)
        return GlobalDistillation(ce, targets, temp)

    def distillation_outputs(
        self,
        loss: Tensor,
        global_term: GlobalDistillation,
        *,
        embedding: Tensor,
        features: Tensor,
        token_masks: Tensor | None = None,
        **terms: Tensor,
    ) -> dict[str, Tensor]:
        """:meth:`~medssl.methods.base.SSLMethod.outputs` of a self-distillation step: the health of the student's
        global logits (``embedding``), of the pooled ``features`` and of the teacher distribution of
        ``global_term``; the loss ``terms``, the teacher temperature and, for a masked student, the masked share of
        the distilled tokens (``token_masks``)."""
        masked = {} if token_masks is None else {"mask_fraction": token_masks.float().mean()}
        return self.outputs(
            loss,
            embedding=embedding,
            features=features,
            teacher_probs=global_term.targets,
            distillation_ce=global_term.ce,
            **terms,
            teacher_temp=loss.new_tensor(global_term.temperature),
            **masked,
        )

    def patch_term(self, student_patch: Tensor, teacher_patch: Tensor, token_mask: Tensor, step: int) -> Tensor:
        """Masked-patch cross-entropy at the masked tokens (``token_mask`` (N, L), whole tokens), with
        the patch centre updated after (``iBOTLoss.forward`` ``q == v`` terms)."""
        temp = schedule_at(self.patch_temp_schedule, step)
        targets = self.patch_centering.probs(teacher_patch, temp)
        loss = masked_patch_ce(student_patch, targets, token_mask, self.params.student_temp)
        self.patch_centering.update(teacher_patch)
        return loss
