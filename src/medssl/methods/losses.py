"""SSL losses as pure functions of tensors: no modules, no state, each tested against its formula."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over masked voxels only (SimMIM / SMIT reconstruction).

    ``mask`` broadcasts to ``prediction`` (1 = masked, counted). Unmasked voxels contribute
    nothing, whatever their values. Returns 0 when nothing is masked.
    """
    mask = mask.to(prediction.dtype).expand_as(prediction)
    total = (torch.abs(prediction - target) * mask).sum()
    return total / mask.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- self-distillation
# DINO / iBOT / SMIT. Student logits s, teacher logits t, K prototypes on the last dimension.


def teacher_probs(teacher_logits: Tensor, centre: Tensor, temperature: float) -> Tensor:
    """Sharpened, centred teacher distribution ``P_t = softmax((t - c) / tau_t)`` over the last dim.

    Computed without gradient: the teacher is a target, updated only by EMA.
    """
    with torch.no_grad():
        return torch.softmax((teacher_logits.detach().float() - centre.float()) / temperature, dim=-1)


def dino_cross_entropy(student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float) -> Tensor:
    """DINO's multi-crop cross-entropy over pairs of *different* views.

    ``L = 1/|P| * sum_{(q, v) in P} mean_b sum_k -P_t^q[b, k] * log_softmax(s^v[b] / tau_s)[k]`` with
    ``P = {(q, v): q != v}``; teacher view ``q`` is the same crop as student view ``q`` (the global
    crops come first in ``student_logits``), so a view is never its own target.
    """
    log_p = [torch.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, n_pairs = None, 0
    for q, target in enumerate(teacher_probs):
        for v, log_student in enumerate(log_p):
            if v == q:
                continue
            term = torch.sum(-target * log_student, dim=-1).mean()
            total = term if total is None else total + term
            n_pairs += 1
    if total is None:
        raise ValueError("dino_cross_entropy needs at least two views (pairs of different views)")
    return total / n_pairs


def masked_patch_ce(
    student_patch_logits: Tensor, teacher_patch_probs: Tensor, mask: Tensor, student_temp: float
) -> Tensor:
    """iBOT's masked-patch cross-entropy: only masked tokens count.

    Logits/probs are ``(B, L, K)``, ``mask`` is ``(B, L)``: boolean, or a weight in ``[0, 1]`` (the
    masked fraction of a token's input when masks are finer than the token grid).
    ``ce[b, l] = sum_k -P_t[b, l, k] * log_softmax(s[b, l] / tau_s)[k]``;
    ``L = mean_b (sum_l w[b, l] * ce[b, l] / sum_l w[b, l])`` -- a per-sample mean over its masked
    tokens, then a mean over samples (a sample with nothing masked contributes 0), so the value does
    not depend on how a global batch is split across processes.
    """
    log_student = torch.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    ce = torch.sum(-teacher_patch_probs * log_student, dim=-1)
    weight = mask.to(ce.dtype)
    per_sample = (ce * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1e-6)
    return per_sample.mean()


def update_centre(centre: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """The new centre ``c' = m * c + (1 - m) * mean(t)``, the mean over every row of ``t`` (pure)."""
    batch_mean = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(dim=0)
    return centre * momentum + batch_mean.reshape(centre.shape).to(centre.dtype) * (1.0 - momentum)


def softmax_entropy(probs: Tensor) -> Tensor:
    """Mean entropy ``-sum_k p_k log p_k`` over all rows (0 log 0 = 0): log K uniform, 0 collapsed."""
    return torch.special.entr(probs.float()).sum(dim=-1).mean()


# --------------------------------------------------------------------------- contrastive and rotation


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over the 2N views of N positive pairs ``(z1[i], z2[i])``.

    With ``u = normalize(cat(z1, z2))`` and ``s_ij = u_i . u_j / tau``, each view ``i`` has the
    other view of its pair ``p(i)`` as the positive and the 2N - 2 remaining views as negatives:
    ``l_i = -log( exp(s_{i,p(i)}) / sum_{j != i} exp(s_ij) )``; the loss is ``mean_i l_i``.
    Lies between 0 (tau -> 0, separable) and large values; equals ``log(2N - 1)`` when all views
    are identical and tends to it as tau -> infinity.
    """
    n = z1.shape[0]
    u = torch.nn.functional.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)
    logits = u @ u.t() / temperature
    # A view is never its own negative: remove the diagonal from the softmax.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
    return torch.nn.functional.cross_entropy(logits, positives)


def moco_v3_infonce(q: Tensor, k: Tensor, temperature: float, label_offset: int = 0) -> Tensor:
    """MoCo v3's contrastive loss of queries against keys, with its ``2 * tau`` scaling.

    ``L = 2 tau * mean_i CE( normalize(q_i) . normalize(k)^T / tau, label_offset + i )``: the
    positive of query ``i`` is key ``label_offset + i``, every other key is a negative. ``k`` may
    hold more rows than ``q`` (keys gathered from every process, ``label_offset = rank * N``). The
    ``2 tau`` factor keeps gradient magnitudes independent of tau (MoCo v3, Chen et al. 2021).
    """
    q = torch.nn.functional.normalize(q.float(), dim=1)
    k = torch.nn.functional.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + label_offset
    return torch.nn.functional.cross_entropy(logits, labels) * (2.0 * temperature)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised MSE: ``mean_i || p_i/|p_i| - z_i/|z_i| ||^2 = mean_i (2 - 2 cos(p_i, z_i))``.

    0 for parallel vectors, 2 for orthogonal, 4 for opposite; invariant to the scale of either
    argument. ``z`` is the target projection (pass it detached).
    """
    p = torch.nn.functional.normalize(p.float(), dim=-1)
    z = torch.nn.functional.normalize(z.float(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()


def rotation_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Rotation-prediction cross-entropy ``mean_i -log softmax(logits_i)[labels_i]`` (RotNet)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels.long())
