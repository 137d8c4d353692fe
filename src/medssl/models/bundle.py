"""Export a fine-tuned segmenter (or a pretrained encoder) as a MONAI bundle.

Layout (MONAI bundle specification)::

    DIR/configs/metadata.json    version, task, labels, network_data_format, the run's test Dice, provenance
    DIR/configs/inference.json   LoadImaged -> Orientationd -> Spacingd -> intensity -> float16 round trip ->
                                 SwinUNETR + sliding-window inference -> argmax -> SaveImaged
    DIR/models/model.pt          the network's state dict (``torch.load(weights_only=True)``)
    DIR/README.md

``python -m monai.bundle run --config_file DIR/configs/inference.json --dataset_dir SCANS`` segments every
``*.nii.gz`` in SCANS into ``DIR/eval`` (``--output_dir`` to change). The preprocessing is the run's
(``medssl.data.preprocess.preprocess_case``: orientation, spacing with ``scale_extent``, CT window or MRI
percentiles) and the image goes through float16 and back, as in the run's volume cache, so the bundle
sees what the run evaluated and its Dice equals the run's. The segmentation is written on that
preprocessed grid (RAS, the run's spacing: the grid the run's Dice is measured on);
``--postprocessing "@postprocessing_original_space"`` inverts it onto each scan's own grid.

The segmenter is MONAI's ``SwinUNETR`` exactly (medssl's adds only the encoder's ``mask_token``, which
export drops), so the bundle needs MONAI alone. The workflow is written as bundle expressions rather
than ignite engines, so it runs without ``pytorch-ignite``.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medssl.errors import MedsslInputError
from medssl.fileio import atomic_write_json, atomic_write_text
from medssl.models.checkpoint import atomic_torch_save, load_segmenter, read_encoder_checkpoint, safe_torch_load
from medssl.models.encoder import MASK_TOKEN_KEY
from medssl.models.segmenter import resolve_norm
from medssl.version import __version__, code_version

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]  # as medssl.data.preprocess.RAS_LABELS


def _versions() -> dict[str, str]:
    import monai

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel")},
    }


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _network_def(encoder: dict[str, Any], out_channels: int, norm_name: Any) -> dict[str, Any]:
    return {
        "_target_": "SwinUNETR",
        "in_channels": encoder["in_channels"],
        "out_channels": out_channels,
        "patch_size": encoder["patch_size"],
        "depths": list(encoder["depths"]),
        "num_heads": list(encoder["num_heads"]),
        "window_size": encoder["window_size"],
        "feature_size": encoder["feature_size"],
        "norm_name": norm_name,
        "spatial_dims": 3,
    }


def _intensity(modality: str, preprocess: dict[str, Any]) -> dict[str, Any]:
    if modality == "ct":
        low, high = preprocess["ct_window"]
        return {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": low,
            "a_max": high,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    low, high = preprocess["mri_percentiles"]
    return {
        "_target_": "ScaleIntensityRangePercentilesd",
        "keys": "image",
        "lower": low,
        "upper": high,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
        "channel_wise": True,
    }


def inference_config(meta: dict[str, Any], modality: str, sw: dict[str, Any], bundle_root: Path) -> dict[str, Any]:
    """The MONAI bundle config that reproduces the run's test-time path on new scans."""
    pre = meta["preprocess"]
    crop = int(meta["crop_size"])
    norm = resolve_norm(meta["norm"], crop, int(meta["encoder"]["feature_size"]))
    norm_name = [norm[0], norm[1]] if isinstance(norm, tuple) else norm
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "dtype": "$np.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": pre["orientation"], "labels": RAS_LABELS},
        {
            "_target_": "Spacingd",
            "keys": "image",
            "pixdim": list(pre["spacing"]),
            "mode": "bilinear",
            "scale_extent": True,
            "dtype": "$np.float32",
        },
        _intensity(modality, pre),
        # the run's volume cache stores images as float16: the same rounding here
        {"_target_": "CastToTyped", "keys": "image", "dtype": "$torch.float16"},
        {"_target_": "CastToTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    save = {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": "seg",
        "output_dtype": "$np.uint8",
        "resample": False,
        "separate_folder": False,
        "print_log": False,
    }
    return {
        "imports": ["$import glob", "$import os", "$import numpy as np", "$import torch", "$import monai"],
        "bundle_root": str(bundle_root.resolve()),
        "dataset_dir": "",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": _network_def(meta["encoder"], int(meta["out_channels"]), norm_name),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': path} for path in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [crop] * 3,
            "sw_batch_size": sw["sw_batch_size"],
            "overlap": sw["sw_overlap"],
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, save],
        },
        "postprocessing_original_space": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                save,
            ],
        },
        "predict": "$lambda batch: monai.data.decollate_batch({'image': batch['image'], "
        "'pred': @inferer(batch['image'].to(@device), @network).cpu()})",
        "initialize": [
            "$monai.utils.set_determinism(seed=0)",
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(torch.load(os.path.join(@bundle_root, 'models', 'model.pt'), "
            "map_location=@device, weights_only=True), strict=True)",
            "$@network.eval()",
        ],
        "run": ["$[@postprocessing(item) for batch in @dataloader for item in @predict(batch)]"],
    }


def _run_dir_files(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``results.json``, ``config.yaml`` and ``run.json`` of the run that holds ``checkpoints/<ckpt>``."""
    run_dir = ckpt.resolve().parent.parent
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        raise MedsslInputError(
            ckpt,
            "a bundle is exported from a finished fine-tuning run: its results.json, "
            f"config.yaml and run.json must be in {run_dir}",
        ) from None
    return results, config, info


def _test_dice(results: dict[str, Any]) -> dict[str, Any]:
    per_case: dict[str, list[float]] = {}
    per_structure: dict[str, list[float]] = {}
    for row in results.get("cases") or []:
        if isinstance(row.get("dice"), int | float) and math.isfinite(row["dice"]):
            per_case.setdefault(str(row["case"]), []).append(float(row["dice"]))
            per_structure.setdefault(str(row["structure"]), []).append(float(row["dice"]))
    cases = {c: sum(v) / len(v) for c, v in per_case.items()}
    return {
        "mean_dice": sum(cases.values()) / len(cases) if cases else None,
        "per_structure": {s: sum(v) / len(v) for s, v in per_structure.items()},
        "per_case": cases,
        "rows": results.get("cases") or [],
    }


def export_segmenter_bundle(ckpt: str | Path, out: str | Path) -> Path:
    """Write the bundle of a fine-tuned segmenter (``best.pt`` of a fine-tuning run)."""
    ckpt, out = Path(ckpt), Path(out)
    model, meta = load_segmenter(ckpt)
    if meta.get("regions"):  # an argmax postprocessing would give wrong label maps with exit 0
        raise MedsslInputError(ckpt, "was trained on nnU-Net regions; a bundle exports only class (argmax) models")
    results, config, info = _run_dir_files(ckpt)
    modality = str(results.get("modality") or info.get("modality") or "").lower()
    if modality not in ("ct", "mri"):
        raise MedsslInputError(ckpt, f"the run records modality {modality!r}; a bundle needs ct or mri")
    sw = {"sw_batch_size": int(config.get("sw_batch_size", 2)), "sw_overlap": float(config.get("sw_overlap", 0.5))}
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k != f"swinViT.{MASK_TOKEN_KEY}"}
    atomic_torch_save(state, out / "models" / "model.pt")
    atomic_write_json(out / "configs" / "inference.json", inference_config(meta, modality, sw, out))
    labels = {str(k): v for k, v in (meta.get("labels") or {}).items()}
    dice = _test_dice(results)
    crop = int(meta["crop_size"])
    in_channels = int(meta["encoder"]["in_channels"])
    metadata = {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medssl {__version__} from run {meta.get('run_id')}"},
        **_versions(),
        "name": f"medssl {meta.get('method')} {meta.get('task')}",
        "task": f"segmentation of {meta.get('task')} ({modality.upper()})",
        "description": f"SwinUNETR fine-tuned by medssl on {meta.get('task')} from the {meta.get('method')} "
        f"encoder ({meta.get('family')}), budget {results.get('budget')}, seed {results.get('seed')}.",
        "authors": "medssl",
        "copyright": "see the training data's licence",
        "data_source": str(info.get("task_path") or meta.get("task")),
        "data_type": "nibabel",
        "image_classes": f"{in_channels}-channel {modality.upper()} intensity scaled to [0, 1]",
        "label_classes": labels,
        "pred_classes": labels,
        "eval_metrics": {"mean_dice": dice["mean_dice"], "per_structure_dice": dice["per_structure"]},
        "intended_use": "research only",
        "references": ["arXiv 2605.18491 (the benchmark protocol medssl follows)"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modality == "ct" else "magnitude",
                    "modality": modality.upper(),
                    "num_channels": in_channels,
                    "spatial_shape": [crop] * 3,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(i): f"image {i}" for i in range(in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": int(meta["out_channels"]),
                    "spatial_shape": [crop] * 3,
                    "dtype": "float32",
                    "value_range": [0, int(meta["out_channels"]) - 1],
                    "is_patch_data": True,
                    "channel_def": labels,
                }
            },
        },
        "medssl": {
            "kind": "segmenter",
            "method": meta.get("method"),
            "family": meta.get("family"),
            "task": meta.get("task"),
            "modality": modality,
            "labels": labels,
            "budget": results.get("budget"),
            "seed": results.get("seed"),
            "run_id": meta.get("run_id"),
            "checkpoint_step": meta.get("step"),
            "val_dice": meta.get("val_dice"),
            "test_dice": dice,
            "preprocess": meta["preprocess"],
            "crop_size": crop,
            **sw,
            "encoder": meta["encoder"],
            "encoder_source": results.get("encoder_source"),
            "code_version": meta.get("code_version") or code_version(),
            "exported_on": platform.node(),
        },
    }
    atomic_write_json(out / "configs" / "metadata.json", metadata)
    atomic_write_text(out / "README.md", _readme(metadata, out))
    return out


def export_encoder_bundle(ckpt: str | Path, out: str | Path) -> Path:
    """Write a bundle of pretrained weights: ``models/model.pt`` holds the ``swinViT.*`` tensors and
    ``configs/inference.json`` builds a ``SwinUNETR`` and loads all of them into its ``swinViT``."""
    ckpt, out = Path(ckpt), Path(out)
    state, meta = read_encoder_checkpoint(ckpt)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    atomic_torch_save({f"swinViT.{k}": v for k, v in state.items() if k != MASK_TOKEN_KEY}, out / "models" / "model.pt")
    network = _network_def(meta["encoder"], 2, "instance")
    config = {
        "imports": ["$import os", "$import torch"],
        "bundle_root": str(out.resolve()),
        "out_channels": 2,
        "network_def": {**network, "out_channels": "@out_channels"},
        "weights": "$torch.load(os.path.join(@bundle_root, 'models', 'model.pt'), weights_only=True)",
        # strict: every encoder tensor must land in swinViT; the decoder stays to be fine-tuned
        "network": "$@network_def.swinViT.load_state_dict({k[len('swinViT.'):]: v for k, v in @weights.items()}) "
        "and @network_def",
        "initialize": [],
        "run": ["$@network"],
    }
    atomic_write_json(out / "configs" / "inference.json", config)
    metadata = {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medssl {__version__}"},
        **_versions(),
        "name": f"medssl {meta['method']} encoder",
        "task": "pretrained Swin encoder weights for SwinUNETR (swinViT)",
        "description": f"Swin encoder pretrained by medssl with {meta['method']} ({meta['family']}), "
        f"{meta.get('steps')} steps.",
        "authors": "medssl",
        "copyright": "see the pretraining data's licence",
        "data_type": "nibabel",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": meta["encoder"]["in_channels"],
                    "dtype": "float32",
                }
            },
            "outputs": {},
        },
        "medssl": {
            "kind": "encoder",
            **{
                k: meta.get(k)
                for k in (
                    "method",
                    "family",
                    "encoder",
                    "spacing",
                    "intensity",
                    "crop_size",
                    "steps",
                    "run_id",
                    "exported_network",
                    "source",
                )
            },
        },
    }
    atomic_write_json(out / "configs" / "metadata.json", metadata)
    atomic_write_text(out / "README.md", _readme(metadata, out))
    return out


def export_bundle(ckpt: str | Path, out: str | Path) -> tuple[Path, str]:
    """A segmenter (``{"model", "meta"}``) or an encoder checkpoint as a MONAI bundle; returns (dir, kind)."""
    payload = safe_torch_load(ckpt)
    if (
        isinstance(payload, dict)
        and "model" in payload
        and isinstance(payload.get("meta"), dict)
        and "out_channels" in payload["meta"]
    ):
        return export_segmenter_bundle(ckpt, out), "segmenter"
    return export_encoder_bundle(ckpt, out), "encoder"


def _readme(metadata: dict[str, Any], out: Path) -> str:
    info = metadata["medssl"]
    lines = [f"# {metadata['name']}", "", metadata["description"], ""]
    if info["kind"] == "segmenter":
        dice = info["test_dice"]["mean_dice"]
        lines += [
            f"Test Dice of the run (mean over cases of the mean over structures): "
            f"{'not recorded' if dice is None else f'{dice:.4f}'}. Labels: {info['labels']}.",
            "",
            "Segment every `*.nii.gz` in a folder (written to `eval/` here, on the run's grid: RAS, spacing "
            f"{info['preprocess']['spacing']} mm):",
            "",
            "```bash",
            f"python -m monai.bundle run --config_file {out}/configs/inference.json --dataset_dir SCANS",
            "# on each scan's own grid instead:",
            f"python -m monai.bundle run --config_file {out}/configs/inference.json --dataset_dir SCANS "
            "--postprocessing '@postprocessing_original_space'",
            "```",
            "",
            f"Preprocessing (as the run): orientation {info['preprocess']['orientation']}, spacing "
            f"{info['preprocess']['spacing']} (bilinear, scale_extent), "
            + (
                f"CT window {info['preprocess']['ct_window']} HU to [0, 1]"
                if info["modality"] == "ct"
                else f"MRI percentiles {info['preprocess']['mri_percentiles']} to [0, 1]"
            )
            + f", float16 rounding; sliding window {info['crop_size']}^3, overlap {info['sw_overlap']}, "
            "Gaussian blending; argmax.",
        ]
    else:
        lines += [
            "`models/model.pt` holds every `swinViT.*` tensor of MONAI's `SwinUNETR`; "
            "`configs/inference.json` builds one (`out_channels` to override) and loads them strictly:",
            "",
            "```python",
            "from monai.bundle import ConfigParser",
            f"parser = ConfigParser(); parser.read_config('{out}/configs/inference.json')",
            "parser['out_channels'] = 14; net = parser.get_parsed_content('network')",
            "```",
        ]
    lines += ["", "Exported by medssl; `configs/metadata.json` holds the provenance (`medssl` entry).", ""]
    return "\n".join(lines)
