"""Export a fine-tuned segmenter (or a pretrained encoder) as a MONAI bundle.

Layout (MONAI bundle specification; ``LICENSE`` and ``docs/data_license.txt`` as the model zoo asks)::

    DIR/configs/inference.json   the run's test-time path (medssl.export.inference), relocatable
    DIR/configs/metadata.json    version, task, labels, network_data_format, license, the run's test Dice,
                                 provenance (``medssl`` entry)
    DIR/configs/logging.conf     the model zoo's console logging (read by ``monai.bundle run``)
    DIR/models/model.pt          the network's state dict (``torch.load(weights_only=True)``)
    DIR/README.md, DIR/LICENSE, DIR/docs/data_license.txt
    DIR/.medssl-bundle.json      the files above, so that a later export over DIR removes stale ones

``python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR --dataset_dir SCANS``
segments every ``*.nii.gz`` in SCANS into ``DIR/eval`` (``--output_dir`` to change), wherever DIR has been
moved and from any working directory (from inside DIR, ``--bundle_root`` may be left out). The
preprocessing is the run's and the image goes through float16 and back, as in the run's volume cache, so
the bundle sees what the run evaluated and its Dice equals the run's. The segmentation is written on that
preprocessed grid; ``--postprocessing "@postprocessing_original_space"`` inverts it onto each scan's own grid.

The segmenter is MONAI's ``SwinUNETR`` exactly (medssl's adds only the encoder's ``mask_token``, which
export drops), so the bundle needs MONAI alone. Every value written is validated first
(:mod:`medssl.export.values`); the run directory is read through :class:`medssl.runs.RunDir`.
"""

from __future__ import annotations

import platform
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import FinetuneConfig, load_config
from medssl.errors import MedsslInputError
from medssl.export.inference import encoder_inference, own_expressions, segmenter_inference
from medssl.export.paths import staged_bundle
from medssl.export.values import (
    CheckpointValues,
    EncoderValues,
    RunValues,
    SegmenterValues,
    check_inert,
    mean_dice,
    validated,
)
from medssl.fileio import atomic_write_json, atomic_write_text
from medssl.models.checkpoint import (
    atomic_torch_save,
    check_meta,
    is_segmenter_payload,
    load_segmenter,
    pretraining_preprocess,
    safe_torch_load,
)
from medssl.models.encoder import MASK_TOKEN_KEY
from medssl.models.load import load_encoder, monai_state_dict
from medssl.runs import RunDir
from medssl.version import __version__

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
LICENSE_ID = "Apache-2.0"  # medssl's licence; the configs it writes and the weights it exports carry it
LICENSE_URL = "https://www.apache.org/licenses/LICENSE-2.0"
# The model zoo's logging.conf: console output, classes MONAI's loader accepts (logging's own).
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def run_command(bundle: str | Path = "DIR") -> str:
    """The command that runs a segmenter bundle from any working directory."""
    config, root = shlex.quote(f"{bundle}/configs/inference.json"), shlex.quote(str(bundle))
    return f"python -m monai.bundle run --config_file {config} --bundle_root {root} --dataset_dir SCANS"


def _versions() -> dict[str, Any]:
    import importlib.metadata

    import monai

    try:
        nibabel = importlib.metadata.version("nibabel")
    except importlib.metadata.PackageNotFoundError:
        nibabel = "unknown"
    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel},
    }


def _finished_run(ckpt: Path) -> RunDir:
    run = RunDir(ckpt.resolve().parent.parent)
    if not run.is_finished() or run.info().get("kind") != "finetune":
        raise MedsslInputError(
            ckpt,
            f"a bundle is exported from a finished fine-tuning run's checkpoints/best.pt; {run.path} is not one "
            "(results.json, run.json and config.yaml are read from it)",
        )
    return run


def segmenter_values(ckpt: Path, meta: dict[str, Any], run: RunDir) -> SegmenterValues:
    """The validated values of a segmenter bundle: from ``best.pt``'s metadata, the run's results.json and
    its config.yaml (each refusal names the file it came from)."""
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    checkpoint: CheckpointValues = validated(
        CheckpointValues,
        {
            "network": {k: meta.get(k) for k in ("encoder", "out_channels", "crop_size", "norm")},
            "preprocess": meta.get("preprocess"),
            "labels": labels,
            "method": meta.get("method"),
            "family": meta.get("family"),
            "task": meta.get("task"),
            "step": meta.get("step"),
            "val_dice": meta.get("val_dice"),
            "run_id": meta.get("run_id"),
            "code_version": meta.get("code_version"),
        },
        ckpt,
    )
    if checkpoint.labels and max(checkpoint.labels) >= checkpoint.network.out_channels:
        raise MedsslInputError(ckpt, f"labels go up to {max(checkpoint.labels)} but the network has fewer outputs")
    results = run.results()
    if not isinstance(results, dict):
        raise MedsslInputError(run.results_path, "not a JSON mapping of results")
    mean, per_structure = mean_dice(results.get("cases") or [], run.results_path)
    run_values: RunValues = validated(
        RunValues,
        {
            "modality": str(results.get("modality") or "").lower(),
            "budget": results.get("budget"),
            "seed": results.get("seed"),
            "mean_dice": mean,
            "per_structure_dice": per_structure,
        },
        run.results_path,
    )
    config = load_config(FinetuneConfig, run.config_path)  # typed sliding-window settings (exit 2 if invalid)
    return SegmenterValues(
        checkpoint=checkpoint, run=run_values, sw_batch_size=config.sw_batch_size, sw_overlap=config.sw_overlap
    )


def segmenter_metadata(values: SegmenterValues) -> dict[str, Any]:
    ck, run = values.checkpoint, values.run
    labels = {str(k): v for k, v in sorted(ck.labels.items())}
    crop, out_channels, in_channels = ck.network.crop_size, ck.network.out_channels, ck.network.encoder.in_channels
    modality = run.modality.upper()
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medssl {__version__}"},
        **_versions(),
        "name": f"medssl {ck.method} {ck.task}",
        "task": f"segmentation of {ck.task} ({modality})",
        "description": f"SwinUNETR fine-tuned by medssl on {ck.task} from the {ck.method} encoder ({ck.family}), "
        f"budget {run.budget}, seed {run.seed}.",
        "authors": "medssl",
        "copyright": "see LICENSE (configs and weights) and docs/data_license.txt (training data)",
        "license": LICENSE_ID,
        "data_source": f"the medssl task {ck.task}",
        "data_type": "nibabel",
        "image_classes": f"{in_channels}-channel {modality} intensity scaled to [0, 1]",
        "label_classes": labels,
        "pred_classes": labels,
        "eval_metrics": {"mean_dice": run.mean_dice, "per_structure_dice": run.per_structure_dice},
        "intended_use": "research only",
        "references": ["arXiv 2605.18491 (the benchmark protocol medssl follows)"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if run.modality == "ct" else "magnitude",
                    "modality": modality,
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
                    "num_channels": out_channels,
                    "spatial_shape": [crop] * 3,
                    "dtype": "float32",
                    "value_range": [0, out_channels - 1],
                    "is_patch_data": True,
                    "channel_def": labels,
                }
            },
        },
        "medssl": {
            "kind": "segmenter",
            "method": ck.method,
            "family": ck.family,
            "task": ck.task,
            "modality": run.modality,
            "labels": labels,
            "budget": run.budget,
            "seed": run.seed,
            "run_id": ck.run_id,
            "checkpoint_step": ck.step,
            "val_dice": ck.val_dice,
            "test_dice": {"mean_dice": run.mean_dice, "per_structure": run.per_structure_dice},
            "preprocess": ck.preprocess.model_dump(mode="json"),
            "crop_size": crop,
            "sw_batch_size": values.sw_batch_size,
            "sw_overlap": values.sw_overlap,
            "encoder": ck.network.encoder.model_dump(mode="json"),
            "code_version": ck.code_version,
            "exported_with": __version__,
            "exported_on": platform.system(),
        },
    }


def _write_documents(
    stage: Path, source: Path, inference: dict[str, Any], metadata: dict[str, Any], readme: str, data_terms: str
) -> None:
    allowed = own_expressions()
    check_inert(inference, source, allowed)
    check_inert(metadata, source, frozenset())  # metadata holds no expression at all
    atomic_write_json(stage / "configs" / "inference.json", inference)
    atomic_write_json(stage / "configs" / "metadata.json", metadata)
    atomic_write_text(stage / "configs" / "logging.conf", LOGGING_CONF)
    atomic_write_text(stage / "README.md", readme)
    atomic_write_text(
        stage / "LICENSE",
        f"SPDX-License-Identifier: {LICENSE_ID}\n\nThe configuration files and model weights of this bundle were "
        f"exported by medssl and are licensed under the {LICENSE_ID} licence: {LICENSE_URL}\n"
        "The data the weights were trained on keeps its own terms: see docs/data_license.txt.\n",
    )
    atomic_write_text(stage / "docs" / "data_license.txt", data_terms)


def export_segmenter_bundle(ckpt: str | Path, out: str | Path) -> Path:
    """Write the bundle of a fine-tuned segmenter (``best.pt`` of a fine-tuning run)."""
    ckpt, out = Path(ckpt), Path(out)
    model, meta = load_segmenter(ckpt)  # every tensor present, shaped, finite
    if meta.get("regions"):  # an argmax postprocessing would give wrong label maps with exit 0
        raise MedsslInputError(ckpt, "was trained on nnU-Net regions; a bundle exports only class (argmax) models")
    values = segmenter_values(ckpt, meta, _finished_run(ckpt))
    metadata = segmenter_metadata(values)
    inference = segmenter_inference(values)
    state = {k: v for k, v in model.state_dict().items() if k != f"swinViT.{MASK_TOKEN_KEY}"}
    with staged_bundle(out) as stage:
        atomic_torch_save(state, stage / "models" / "model.pt")
        _write_documents(
            stage,
            ckpt,
            inference,
            metadata,
            _segmenter_readme(values, metadata),
            f"The weights were trained on the medssl task {values.checkpoint.task}. That data keeps the terms of "
            "its source (its dataset's licence or data use agreement); check them before sharing this bundle.\n",
        )
    return out


def encoder_values(ckpt: Path, meta: dict[str, Any]) -> EncoderValues:
    typed = check_meta(ckpt, meta)
    raw_source = meta.get("source")
    source: dict[str, Any] = raw_source if isinstance(raw_source, dict) else {}
    return validated(
        EncoderValues,
        {
            "encoder": typed.encoder,
            "method": typed.method,
            "family": typed.family,
            "steps": meta.get("steps") or 0,
            "preprocess": pretraining_preprocess(typed, ckpt),
            "crop_size": typed.crop_size,
            "run_id": meta.get("run_id"),
            "exported_network": meta.get("exported_network"),
            "source_layout": source.get("layout"),
            "source_sha256": source.get("sha256"),
        },
        ckpt,
    )


def encoder_metadata(values: EncoderValues) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medssl {__version__}"},
        **_versions(),
        "name": f"medssl {values.method} encoder",
        "task": "pretrained Swin encoder weights for SwinUNETR (swinViT)",
        "description": f"Swin encoder pretrained by medssl with {values.method} ({values.family}), "
        f"{values.steps} steps.",
        "authors": "medssl",
        "copyright": "see LICENSE (configs and weights) and docs/data_license.txt (pretraining data)",
        "license": LICENSE_ID,
        "data_type": "nibabel",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": values.encoder.in_channels,
                    "dtype": "float32",
                }
            },
            "outputs": {},
        },
        "medssl": {
            "kind": "encoder",
            "method": values.method,
            "family": values.family,
            "encoder": values.encoder.model_dump(mode="json"),
            "pretraining_preprocess": None if values.preprocess is None else values.preprocess.model_dump(mode="json"),
            "crop_size": values.crop_size,
            "steps": values.steps,
            "run_id": values.run_id,
            "exported_network": values.exported_network,
            "source_layout": values.source_layout,
            "source_sha256": values.source_sha256,
            "exported_with": __version__,
        },
    }


def export_encoder_bundle(ckpt: str | Path, out: str | Path) -> Path:
    """Write a bundle of pretrained weights: ``models/model.pt`` holds the ``swinViT.*`` tensors and
    ``configs/inference.json`` builds a ``SwinUNETR`` and loads all of them into its ``swinViT``."""
    ckpt, out = Path(ckpt), Path(out)
    encoder, meta = load_encoder(ckpt)  # every tensor present, shaped, finite
    values = encoder_values(ckpt, meta)
    metadata = encoder_metadata(values)
    with staged_bundle(out) as stage:
        atomic_torch_save(monai_state_dict(encoder), stage / "models" / "model.pt")
        _write_documents(
            stage,
            ckpt,
            encoder_inference(values),
            metadata,
            _encoder_readme(values),
            "The weights were pretrained on the corpus of their medssl run (or come from the file named in "
            "configs/metadata.json); that data keeps the terms of its sources.\n",
        )
    return out


def export_bundle(ckpt: str | Path, out: str | Path) -> tuple[Path, str]:
    """A segmenter (``{"model", "meta"}``) or an encoder checkpoint as a MONAI bundle; returns (dir, kind)."""
    if is_segmenter_payload(safe_torch_load(ckpt)):
        return export_segmenter_bundle(ckpt, out), "segmenter"
    return export_encoder_bundle(ckpt, out), "encoder"


def _segmenter_readme(values: SegmenterValues, metadata: dict[str, Any]) -> str:
    ck, pre = values.checkpoint, values.checkpoint.preprocess
    dice = values.run.mean_dice
    intensity = (
        f"CT window {list(pre.ct_window)} HU to [0, 1]"
        if values.run.modality == "ct"
        else f"MRI percentiles {list(pre.mri_percentiles)} to [0, 1]"
    )
    return "\n".join(
        [
            f"# {metadata['name']}",
            "",
            metadata["description"],
            "",
            f"Test Dice of the run (mean over cases of the mean over structures): "
            f"{'not recorded' if dice is None else f'{dice:.4f}'}. Labels: {metadata['pred_classes']}.",
            "",
            "Segment every `*.nii.gz` in a folder SCANS (written to `eval/` in the bundle, on the run's grid: "
            f"{pre.orientation}, spacing {list(pre.spacing)} mm). The bundle may be moved anywhere; from another "
            "folder give its path twice, from inside it `--bundle_root` may be left out:",
            "",
            "```bash",
            run_command("BUNDLE"),
            "cd BUNDLE && python -m monai.bundle run --config_file configs/inference.json --dataset_dir SCANS",
            "# on each scan's own grid instead:",
            run_command("BUNDLE") + " --postprocessing '@postprocessing_original_space'",
            "```",
            "",
            f"Preprocessing (as the run): orientation {pre.orientation}, spacing {list(pre.spacing)} (bilinear, "
            f"scale_extent), {intensity}, float16 rounding; sliding window {ck.network.crop_size}^3, overlap "
            f"{values.sw_overlap}, Gaussian blending; argmax.",
            "",
            f"Licence: {LICENSE_ID} (LICENSE); the training data's terms: docs/data_license.txt. Exported by medssl; "
            "`configs/metadata.json` holds the provenance (`medssl` entry).",
            "",
        ]
    )


def _encoder_readme(values: EncoderValues) -> str:
    return "\n".join(
        [
            f"# medssl {values.method} encoder",
            "",
            f"Swin encoder pretrained by medssl with {values.method} ({values.family}). `models/model.pt` holds "
            "every `swinViT.*` tensor of MONAI's `SwinUNETR`; `configs/inference.json` builds one "
            "(`out_channels` to override) and loads them strictly:",
            "",
            "```python",
            "from monai.bundle import ConfigParser",
            "parser = ConfigParser(); parser.read_config('BUNDLE/configs/inference.json')",
            "parser['bundle_root'] = 'BUNDLE'; parser['out_channels'] = 14",
            "net = parser.get_parsed_content('network')",
            "```",
            "",
            f"Licence: {LICENSE_ID} (LICENSE); the pretraining data's terms: docs/data_license.txt.",
            "",
        ]
    )
