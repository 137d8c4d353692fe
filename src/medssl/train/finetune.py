"""Fine-tuning: an encoder inside the SwinUNETR-style segmenter on one task, budget and seed.

The recipe is identical for every encoder (docs/design.md §7): DiceCE, AdamW with warm-up + cosine,
positive/negative crops, validation Dice every ``val_every`` steps with sliding-window inference
(the convergence curve), and per-case test metrics from the best validation checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import Tensor, nn

from medssl.config import (
    IDENTITY_TRANSFORMER,
    RANDOM_INIT,
    EncoderConfig,
    FinetuneConfig,
    PreprocessConfig,
    config_hash,
)
from medssl.data.cache import CachedVolume, VolumeCache, cache_task
from medssl.data.datasets import SegmentationCropDataset, load_eval_case
from medssl.data.regions import Regions, region_targets
from medssl.data.splits import run_split
from medssl.data.tasks import TaskFolder, load_task
from medssl.errors import ConfigError, MedsslInputError, look_up_option
from medssl.evaluate import case_metrics, lesion_rows, mean_dice, predict_volume
from medssl.fileio import file_sha256
from medssl.models.adapt import fit_encoder
from medssl.models.checkpoint import encoder_meta, load_encoder_state, safe_torch_load, save_encoder, save_segmenter
from medssl.models.load import read_encoder_checkpoint
from medssl.models.segmenter import SwinSegmenter, resolve_norm
from medssl.runs import RunDir, RunWork, encoder_run_info
from medssl.train.distributed import DistInfo, barrier
from medssl.train.drift import encoder_drift, encoder_snapshot
from medssl.train.entry import perform_training_run
from medssl.train.loop import train
from medssl.training_module import TrainingHooks, param_groups

ENCODER_PREFIX = "model.swinViT."


def swin_layer_id(name: str, depths: list[int] | tuple[int, ...]) -> int:
    """Layer index of an encoder parameter for layer-wise lr decay, as SimMIM's ``get_swin_layer``
    (microsoft/SimMIM ``optimizer.py``) on MONAI's key names: the patch embedding and mask token are
    layer 0, block ``j`` of stage ``s`` (1-based ``layers{s}.0.blocks.{j}``) is ``sum(depths[:s-1]) + j + 1``,
    a stage's patch merging belongs to its last block, anything else (final norms) to the top layer."""
    parts = name.split(".")
    if parts[0] in ("patch_embed", "mask_token", "pos_drop"):
        return 0
    if parts[0].startswith("layers") and parts[0][6:].isdigit() and len(parts) > 3:
        stage = int(parts[0][6:]) - 1
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        return sum(depths[: stage + 1])  # downsample (patch merging) of the stage
    return sum(depths) + 1


@dataclass(frozen=True)
class EncoderExport:
    """Where a run also saves the encoder of its tested segmenter, and the row name and family it gets
    (the positive control: a supervised encoder, ``medssl.train.supervised``)."""

    path: Path
    method: str
    family: str


def plateau_reached(curve: list[float], patience: int, min_delta: float = 0.0) -> bool:
    """True when the last ``patience`` validations did not beat the best before them by ``min_delta``."""
    best, since = float("-inf"), 0
    for value in curve:
        if value > best + min_delta:
            best, since = value, 0
        else:
            since += 1
    return since >= patience


def segmentation_loss(name: str, regions: Regions | None = None) -> nn.Module:
    """The fine-tuning loss: softmax Dice(+CE) over classes, or for nnU-Net regions its ``DC_and_BCE_loss``
    (nnunetv2 ``nnUNetTrainer._build_loss``): soft Dice on a sigmoid per region (+ BCE), against
    :func:`~medssl.data.regions.region_targets`."""
    look_up_option("segmentation loss", name, ("dice_ce", "dice"))
    if regions is None:
        return (
            DiceCELoss(to_onehot_y=True, softmax=True)
            if name == "dice_ce"
            else DiceLoss(to_onehot_y=True, softmax=True)
        )
    return _RegionLoss(with_bce=name == "dice_ce")


class _RegionLoss(nn.Module):
    def __init__(self, with_bce: bool) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss() if with_bce else None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = self.dice(logits, target)
        return loss + self.bce(logits, target) if self.bce is not None else loss


class SegmentationModule(TrainingHooks):
    """Adapts the segmenter to the loop's ``forward(batch, step) -> {"loss": ...}`` interface.

    It also carries the fine-tuning options for pretrained transformers: per-parameter learning-rate
    multipliers (``encoder_lr_scale`` times SimMIM-style layer decay) through the loop's
    ``param_groups`` hook, and a frozen-encoder warm phase through ``cancel_gradients``: during the
    first ``freeze_encoder_steps`` steps the encoder's gradients are dropped, so AdamW neither moves
    its weights nor accumulates moments for them (decoder first, then everything)."""

    def __init__(
        self,
        model: SwinSegmenter,
        loss: str = "dice_ce",
        encoder_lr_scale: float = 1.0,
        layer_decay: float = 1.0,
        freeze_encoder_steps: int = 0,
        regions: Regions | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.encoder_lr_scale = encoder_lr_scale
        self.layer_decay = layer_decay
        self.freeze_encoder_steps = freeze_encoder_steps
        self.regions = regions
        self.loss_fn = segmentation_loss(loss, regions)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        logits = self.model(batch["image"])
        label = batch["label"] if self.regions is None else region_targets(batch["label"], self.regions)
        loss = self.loss_fn(logits, label)
        return {"loss": loss}

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of parameter ``name`` (1 for the decoder)."""
        if not name.startswith(ENCODER_PREFIX):
            return 1.0
        depths = self.model.encoder_config.depths
        assert depths is not None  # EncoderConfig fills it from its preset
        top = sum(depths) + 1
        return self.encoder_lr_scale * self.layer_decay ** (top - swin_layer_id(name[len(ENCODER_PREFIX) :], depths))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(self, weight_decay, lr_scale=self.lr_scale)

    def cancel_gradients(self, step: int) -> None:
        if step < self.freeze_encoder_steps:
            for p in self.model.swinViT.parameters():
                p.grad = None


def resolve_encoder(config: FinetuneConfig) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
    """Encoder state and metadata (method, family) for the run; random init when no checkpoint."""
    if config.encoder_checkpoint is None:
        identity = config.transformer == "identity"
        method, family = (IDENTITY_TRANSFORMER, "control") if identity else (RANDOM_INIT, "none")
        return None, {"method": method, "family": family, "encoder": config.encoder.model_dump(mode="json")}
    state, meta = read_encoder_checkpoint(config.encoder_checkpoint)
    return state, meta


def encoder_identity(config: FinetuneConfig) -> dict[str, str]:
    """The encoder file's content hash: a run is bound to the weights it started from, not a path."""
    path = config.encoder_checkpoint
    return {"encoder_sha256": file_sha256(path)} if path is not None and Path(path).is_file() else {}


def preprocessing_agreement(meta: dict[str, Any], preprocess: PreprocessConfig, modality: str) -> dict[str, str]:
    """How the encoder's pretraining preprocessing compares with this task's (recorded in run.json).

    A pretrained encoder only transfers what it saw: a corpus resampled to another spacing or scaled
    with another CT window gives the segmenter inputs the encoder never met. ``spacing`` and
    ``intensity`` read ``"same"``, ``"differs: ..."`` (both sides named), or ``"unknown"`` (random init,
    an external encoder without metadata). MRI tasks are normalised by percentiles by design (CT->MRI
    transfer), so for them only the spacing is compared and the intensity reads ``"ct->mri"``.
    """
    if "spacing" not in meta:
        return {"spacing": "unknown", "intensity": "unknown"}
    ours = [float(v) for v in preprocess.spacing]
    theirs = [float(v) for v in meta["spacing"]]
    spacing = "same" if ours == theirs else f"differs: pretrained {theirs} mm, task {ours} mm"
    intensity_meta = meta.get("intensity") or {}
    if modality != "ct":
        intensity = "ct->mri"
    elif "ct_window" not in intensity_meta:
        intensity = "unknown"
    else:
        window = [float(v) for v in intensity_meta["ct_window"]]
        task_window = [float(v) for v in preprocess.ct_window]
        intensity = "same" if window == task_window else f"differs: pretrained CT window {window}, task {task_window}"
    return {"spacing": spacing, "intensity": intensity}


def check_label_values(task: TaskFolder, volumes: dict[str, CachedVolume]) -> None:
    """Refuse, before training, labels that dataset.json does not declare and tasks without foreground
    (the network has ``max(labels) + 1`` outputs: a stray value fails mid-run, and a task with no
    foreground would "finish" with Dice over no structure)."""
    declared = set(task.labels)
    for case_id in sorted(volumes):
        volume = volumes[case_id]
        undeclared = sorted(set(volume.class_voxels) - declared)
        if undeclared:
            shown = ", ".join(str(v) for v in undeclared[:10]) + (" ..." if len(undeclared) > 10 else "")
            raise MedsslInputError(
                volume.label_source or case_id, f"label values not declared in {task.root / 'dataset.json'}: {shown}"
            )
    if not any(c != 0 and n > 0 for v in volumes.values() for c, n in v.class_voxels.items()):
        raise MedsslInputError(task.root, "no case has any foreground label (every label volume is background)")


def finetune_info(config: FinetuneConfig, task: TaskFolder, meta: dict[str, Any], n_train: int) -> dict[str, Any]:
    """The run.json fields of a fine-tuning run (the lifecycle adds kind, id, hash and provenance)."""
    return {
        **encoder_run_info(config, task, meta, n_train),
        "preset": meta.get("preset", config.encoder.preset),
        "crop_size": config.crop_size,
        "steps": config.schedule.steps,
        **({"encoder_source": meta["source"]} if "source" in meta else {}),  # an external encoder's file
    }


def run_finetune(
    config: FinetuneConfig,
    run_dir: str | Path,
    info: DistInfo | None = None,
    kind: str = "finetune",
    export: EncoderExport | None = None,
) -> dict[str, Any]:
    """Fine-tune into ``run_dir``; resume if interrupted; return stored results when finished.

    ``kind`` names the run in run.json and results.json: ``finetune``, or ``supervised`` for the segmenter
    that trains the positive control's encoder (``medssl.train.supervised``), which no report counts as a
    fine-tuning result. ``export``: the tested segmenter's encoder is saved there too, with its metadata,
    before the run is marked finished."""

    def open_work(run: RunDir, dist: DistInfo) -> RunWork:
        inputs = open_finetune_inputs(config, run)
        return RunWork(
            kind, inputs.run_info, lambda started: finetune_body(config, inputs, run, dist, started, kind, export)
        )

    return perform_training_run(config, run_dir, open_work, info, identity=encoder_identity(config))


@dataclass
class FinetuneInputs:
    """What a fine-tuning run reads before it starts, every piece checked (a refusal binds nothing)."""

    task: TaskFolder
    encoder_state: dict[str, Tensor] | None
    encoder_meta: dict[str, Any]
    encoder_config: EncoderConfig
    volumes: dict[str, CachedVolume]
    split: dict[str, Any]
    train_ids: list[str]
    agreement: dict[str, str]
    run_info: dict[str, Any]
    encoder_fit: dict[str, Any]  # input channels adapted, axis order checked (models.adapt.fit_encoder)
    lesion_structures: dict[int, str]  # the structures scored lesion-wise (config.lesion_metrics)


def open_finetune_inputs(config: FinetuneConfig, run: RunDir) -> FinetuneInputs:
    """Task, encoder, preprocessed volumes and the split; ``MedsslInputError`` on the first bad one."""
    if config.task is None:
        raise ConfigError("task", "fine-tuning needs a task folder (task=PATH)")
    task = load_task(config.task)
    enc_state, enc_meta = resolve_encoder(config)
    # input channels adapted (or refused) and axis order checked before any volume is cached
    encoder_config, enc_state, encoder_fit = fit_encoder(
        enc_state,
        enc_meta,
        task.n_channels,
        config.preprocess.orientation,
        config.input_channels,
        str(config.encoder_checkpoint or "encoder"),
    )
    cache = VolumeCache(config.cache_dir or run.path / "cache")
    volumes = cache_task(task, cache, config.preprocess)
    check_label_values(task, volumes)
    split, train_ids = run_split(config, sorted(volumes), run.path / "splits.json")
    agreement = preprocessing_agreement(enc_meta, config.preprocess, task.modality) if enc_state is not None else {}
    run_info = {
        **finetune_info(config, task, enc_meta, len(train_ids)),
        **({"pretraining_preprocessing": agreement} if agreement else {}),
        **({"encoder_fit": encoder_fit} if encoder_fit else {}),
    }
    lesion_structures = config.lesion_metrics.lesion_structures(task.structures)
    return FinetuneInputs(
        task,
        enc_state,
        enc_meta,
        encoder_config,
        volumes,
        split,
        train_ids,
        agreement,
        run_info,
        encoder_fit,
        lesion_structures,
    )


def finetune_body(
    config: FinetuneConfig,
    inputs: FinetuneInputs,
    run: RunDir,
    info: DistInfo,
    started: float,
    kind: str = "finetune",
    export: EncoderExport | None = None,
) -> dict[str, Any]:
    """The work of a fine-tuning run (inside the lifecycle): train, validate, test the best checkpoint."""
    task, volumes, split, train_ids = inputs.task, inputs.volumes, inputs.split, inputs.train_ids
    enc_state, enc_meta, encoder_config = inputs.encoder_state, inputs.encoder_meta, inputs.encoder_config
    agreement, run_info = inputs.agreement, inputs.run_info
    torch.manual_seed(config.seed)
    model = SwinSegmenter(
        encoder_config, task.n_outputs, crop_size=config.crop_size, norm=config.norm, transformer=config.transformer
    )
    if enc_state is not None:
        report = load_encoder_state(model, enc_state, source=str(config.encoder_checkpoint), prefix="swinViT.")
        if info.is_main:
            run.log(f"encoder {enc_meta['method']}: {report.summary()} from {config.encoder_checkpoint}")
            run.log(
                f"pretraining vs task preprocessing: spacing {agreement['spacing']}, intensity {agreement['intensity']}"
            )
            if "source" in enc_meta:
                run.log(
                    f"external encoder {enc_meta['source']['path']} ({enc_meta['source']['layout']}): "
                    f"{enc_meta['source']['coverage']}, sha256 {enc_meta['source']['sha256'][:12]}"
                )
            run.log(f"axis order: {inputs.encoder_fit['axis_order']}")
    elif info.is_main:
        blocks = ", Swin blocks replaced by identity" if config.transformer == "identity" else ""
        run.log(f"encoder: random initialisation (seed {config.seed}){blocks}")
    if info.is_main and "input_channels" in inputs.encoder_fit:
        fit = inputs.encoder_fit["input_channels"]
        run.log(f"input channels: encoder {fit['from']} -> task {fit['to']} ({fit['mode']})")
    start_weights = encoder_snapshot(model.swinViT)  # where the encoder starts: its drift is measured
    if info.is_main:
        run.log(
            f"task {task.name} ({task.modality}): {len(train_ids)} training cases (budget "
            f"{config.budget}), {len(split['val'])} validation, {len(split['test'])} test"
        )

    structures = task.structures
    val_cases = [load_eval_case(volumes[c]) for c in split["val"]]
    seg_meta = {
        "encoder": encoder_config.model_dump(mode="json"),
        "out_channels": task.n_outputs,
        "crop_size": config.crop_size,
        "norm": config.norm,
        "transformer": config.transformer,
        "method": enc_meta["method"],
        "family": enc_meta["family"],
        "task": task.name,
        "labels": task.labels,
        **({"regions": task.regions.to_json()} if task.regions is not None else {}),
        "preprocess": config.preprocess.model_dump(mode="json"),
        "run_id": run.id,
    }
    best_path = run.checkpoint_dir / "best.pt"
    prior = [r for r in run.read_metrics() if "val_dice" in r]
    best = {"dice": max((r["val_dice"] for r in prior), default=-1.0)}
    val_history = [r["val_dice"] for r in prior]

    def predict(network: nn.Module, image: Tensor) -> Tensor:
        """A label map, by sliding windows (regions: sigmoids painted in regions_class_order)."""
        return predict_volume(
            network, image, config.crop_size, config.sw_batch_size, config.sw_overlap, info.device, task.regions
        )

    def validate(module: nn.Module, step: int) -> dict[str, Any]:
        assert isinstance(module, SegmentationModule)  # the loop passes the module it was given
        per_structure: dict[str, list[float]] = {}
        for case in val_cases:
            pred = predict(module.model, case["image"])
            for name, d in mean_dice(pred, case["label"][0], structures, task.regions).items():
                per_structure.setdefault(name, []).append(d)
        means = {k: sum(v) / len(v) for k, v in per_structure.items()}
        score = sum(means.values()) / len(means) if means else 0.0
        if score > best["dice"]:
            best["dice"] = score
            save_segmenter(best_path, module.model, {**seg_meta, "step": step, "val_dice": score})
        val_history.append(score)
        record: dict[str, Any] = {
            "val_dice": score,
            "val_dice_per_structure": means,
            "epoch": step * config.schedule.batch_size / max(len(train_ids), 1),
        }
        if config.early_stop_patience is not None and plateau_reached(
            val_history, config.early_stop_patience, config.early_stop_min_delta
        ):
            record["stop"] = True
        return record

    dataset = SegmentationCropDataset(
        [volumes[c] for c in train_ids],
        config.crop_size,
        seed=config.seed,
        augmentation=config.augment,
        class_balanced=config.crop_sampling == "class_balanced",
    )
    module = SegmentationModule(
        model,
        config.loss,
        encoder_lr_scale=config.encoder_lr_scale,
        layer_decay=config.layer_decay,
        freeze_encoder_steps=config.freeze_encoder_steps,
        regions=task.regions,
    )
    result = train(
        module,
        dataset,
        config.schedule,
        run,
        info,
        validate=validate,
        val_every=config.val_every,
        description=f"finetune {task.name} b{config.budget}",
    )
    barrier(info)

    drift_final = encoder_drift(start_weights, model.swinViT)
    # Test with the best validation checkpoint (the final weights when validation never ran).
    if best_path.exists():
        model.load_state_dict(safe_torch_load(best_path)["model"], strict=True)
    elif info.is_main:
        save_segmenter(best_path, model, {**seg_meta, "step": config.schedule.steps})
    rows: list[dict[str, Any]] = []
    lesions: list[dict[str, Any]] = []
    if info.is_main:
        for cid in split["test"]:
            case = load_eval_case(volumes[cid])
            pred = predict(model, case["image"])
            rows += case_metrics(
                pred,
                case["label"][0],
                structures,
                case["spacing"],
                config.nsd_tolerance_mm,
                case_id=cid,
                regions=task.regions,
            )
            lesions += lesion_rows(
                pred, case["label"][0], inputs.lesion_structures, config.lesion_metrics, cid, task.regions
            )
    curve = [
        {"step": r["step"], "epoch": r.get("epoch"), "val_dice": r["val_dice"]}
        for r in run.read_metrics()
        if "val_dice" in r
    ]
    best_rec = max(curve, key=lambda r: r["val_dice"], default=None)
    drift = encoder_drift(start_weights, model.swinViT)
    if info.is_main:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in drift.items() if v is not None)
        run.log(f"encoder drift of the tested weights (relative change from the start): {shown}")
    feature_size = encoder_config.feature_size
    assert feature_size is not None  # EncoderConfig fills it from its preset
    lesion_settings: dict[str, Any] = config.lesion_metrics.model_dump(mode="json")
    lesion_settings["structures"] = sorted(inputs.lesion_structures.values())
    results = {
        **{k: run_info[k] for k in ("method", "family", "task", "modality", "budget", "n_train", "seed")},
        "kind": kind,
        "labels": {str(k): v for k, v in structures.items()},
        **({"regions": task.regions.to_json()} if task.regions is not None else {}),
        "cases": rows,
        **({"lesions": lesions, "lesion_detection": lesion_settings} if inputs.lesion_structures else {}),
        **({"encoder_fit": inputs.encoder_fit} if inputs.encoder_fit else {}),
        "val_curve": curve,
        "best_step": best_rec["step"] if best_rec else None,
        "best_val_dice": best_rec["val_dice"] if best_rec else None,
        "model": str(best_path.relative_to(run.path)),
        "wall_seconds": time.time() - started,
        "step_seconds": result.step_seconds,
        "steps": config.schedule.steps,
        "steps_run": result.steps,
        "stopped_early_at": result.stopped_at,
        "early_stop_patience": config.early_stop_patience,
        **({"encoder_source": run_info["encoder_source"]} if "encoder_source" in run_info else {}),
        "data_wait_share": result.data_wait_share,
        "norm": str(resolve_norm(config.norm, config.crop_size, feature_size)),
        "transformer": config.transformer,
        "encoder_drift": drift,  # of the tested (best validation) weights
        "encoder_drift_final": drift_final,  # of the weights the last step left
    }
    if export is not None and info.is_main:
        results["encoder"] = _export_encoder(export, model, encoder_config, config, run, results)
    return results


def _export_encoder(
    export: EncoderExport,
    model: SwinSegmenter,
    encoder_config: EncoderConfig,
    config: FinetuneConfig,
    run: RunDir,
    results: dict[str, Any],
) -> str:
    """Save the tested segmenter's encoder as an encoder checkpoint; returns its path in the run."""
    per_case: dict[str, list[float]] = {}
    for row in results["cases"]:
        per_case.setdefault(row["case"], []).append(float(row["dice"]))
    test_dice = sum(sum(v) / len(v) for v in per_case.values()) / len(per_case) if per_case else None
    meta = encoder_meta(
        method=export.method,
        family=export.family,
        encoder=encoder_config,
        preprocess=config.preprocess.model_dump(mode="json"),
        crop_size=config.crop_size,
        steps=int(results["steps_run"]),
        config_hash=config_hash(config),
        extra={"run_id": run.id, "trained_on": results["task"], "test_dice": test_dice},
    )
    save_encoder(export.path, model.encoder, meta)
    return str(export.path.relative_to(run.path)) if export.path.is_relative_to(run.path) else str(export.path)
