"""The MONAI bundle configs: built from validated values and the exporter's own expressions only.

The segmenter's ``configs/inference.json`` reproduces the run's test-time path: ``LoadImaged`` ->
``Orientationd`` -> ``Spacingd`` (``scale_extent``, as ``medssl.data.preprocess.preprocess_case``) -> CT
window or MRI percentiles -> the volume cache's float16 round trip -> ``SwinUNETR`` with Gaussian
sliding-window inference -> argmax -> ``SaveImaged``. It is written as bundle expressions rather than
ignite engines, so it runs without ``pytorch-ignite``.

Relocatable, as the model zoo's bundles are: ``"bundle_root": "."`` and every file of the bundle named as
``@bundle_root + '/models/model.pt'``. ``monai.bundle run`` resolves ``"."`` against the working directory,
so the bundle runs from its own folder as it is, and from anywhere with ``--bundle_root DIR`` (the command
medssl prints and the bundle's README gives); nothing in it names the folder it was exported to.
"""

from __future__ import annotations

from typing import Any

from medssl.data.preprocess import RAS_LABELS
from medssl.export.values import EncoderValues, SegmenterValues
from medssl.models.segmenter import resolve_norm, swin_unetr_kwargs

_OWN: set[str] = set()


def own(expression: str) -> str:
    """Register one of the exporter's own expressions (the only ones a bundle may hold)."""
    _OWN.add(expression)
    return expression


BUNDLE_ROOT = "."
MODEL_PATH = own("$@bundle_root + '/models/model.pt'")
OUTPUT_DIR = own("$@bundle_root + '/eval'")
IMPORTS = [own(f"$import {m}") for m in ("glob", "os", "numpy as np", "torch", "monai")]
DATALIST = own("$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')))")
DEVICE = own("$torch.device('cuda' if torch.cuda.is_available() else 'cpu')")
NETWORK = own("$@network_def.to(@device)")
NP_FLOAT32, NP_UINT8 = own("$np.float32"), own("$np.uint8")
TORCH_FLOAT16, TORCH_FLOAT32 = own("$torch.float16"), own("$torch.float32")
DATA = own("$[{'image': path} for path in @datalist]")
PREDICT = own(
    "$lambda batch: monai.data.decollate_batch({'image': batch['image'], "
    "'pred': @inferer(batch['image'].to(@device), @network).cpu()})"
)
INITIALIZE = [
    own("$monai.utils.set_determinism(seed=0)"),
    own("$torch.set_grad_enabled(False)"),
    own("$@network.load_state_dict(torch.load(@model_path, map_location=@device, weights_only=True), strict=True)"),
    own("$@network.eval()"),
]
RUN = [own("$[@postprocessing(item) for batch in @dataloader for item in @predict(batch)]")]
REFS = {name: own(f"@{name}") for name in ("output_dir", "preprocessing", "dataset", "out_channels")}
# the encoder bundle: every swinViT.* tensor loaded strictly; the decoder stays to be fine-tuned
ENCODER_WEIGHTS = own("$torch.load(@model_path, weights_only=True)")
ENCODER_NETWORK = own(
    "$@network_def.swinViT.load_state_dict({k[len('swinViT.'):]: v for k, v in @weights.items()}) and @network_def"
)
ENCODER_IMPORTS = [own("$import os"), own("$import torch")]
ENCODER_RUN = [own("$@network")]


def own_expressions() -> frozenset[str]:
    return frozenset(_OWN)


def network_def(values: SegmenterValues) -> dict[str, Any]:
    """The ``SwinUNETR`` of a segmenter bundle (JSON: tuples as lists)."""
    net = values.network
    norm = resolve_norm(net.norm, net.crop_size, int(net.encoder.feature_size or 0))
    kwargs = swin_unetr_kwargs(net.encoder, net.out_channels, list(norm) if isinstance(norm, tuple) else norm)
    return {"_target_": "SwinUNETR", **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


def _intensity(values: SegmenterValues) -> dict[str, Any]:
    """The run's intensity scaling to [0, 1]: CT window, or MRI percentiles per channel."""
    pre = values.preprocess
    scaled = {"keys": "image", "b_min": 0.0, "b_max": 1.0, "clip": True}
    if values.modality == "ct":
        low, high = pre.ct_window
        return {"_target_": "ScaleIntensityRanged", "a_min": low, "a_max": high, **scaled}
    low, high = pre.mri_percentiles
    return {"_target_": "ScaleIntensityRangePercentilesd", "lower": low, "upper": high, **scaled, "channel_wise": True}


def segmenter_inference(values: SegmenterValues) -> dict[str, Any]:
    """``configs/inference.json`` of a fine-tuned segmenter."""
    crop = values.network.crop_size
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "dtype": NP_FLOAT32},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": values.preprocess.orientation,
            "labels": [list(pair) for pair in RAS_LABELS],
        },
        {
            "_target_": "Spacingd",
            "keys": "image",
            "pixdim": [float(s) for s in values.preprocess.spacing],
            "mode": "bilinear",
            "scale_extent": True,
            "dtype": NP_FLOAT32,
        },
        _intensity(values),
        # the run's volume cache stores images as float16: the same rounding here
        {"_target_": "CastToTyped", "keys": "image", "dtype": TORCH_FLOAT16},
        {"_target_": "CastToTyped", "keys": "image", "dtype": TORCH_FLOAT32},
    ]
    save = {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": REFS["output_dir"],
        "output_postfix": "seg",
        "output_dtype": NP_UINT8,
        "resample": False,
        "separate_folder": False,
        "print_log": False,
    }
    argmax = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    return {
        "imports": IMPORTS,
        "bundle_root": BUNDLE_ROOT,
        "model_path": MODEL_PATH,
        "dataset_dir": "",
        "output_dir": OUTPUT_DIR,
        "datalist": DATALIST,
        "device": DEVICE,
        "network_def": network_def(values),
        "network": NETWORK,
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": DATA, "transform": REFS["preprocessing"]},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": REFS["dataset"],
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [crop] * 3,
            "sw_batch_size": values.sw_batch_size,
            "overlap": values.sw_overlap,
            "mode": "gaussian",
        },
        "postprocessing": {"_target_": "Compose", "transforms": [argmax, save]},
        "postprocessing_original_space": {
            "_target_": "Compose",
            "transforms": [
                argmax,
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": REFS["preprocessing"],
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                save,
            ],
        },
        "predict": PREDICT,
        "initialize": INITIALIZE,
        "run": RUN,
    }


def encoder_inference(values: EncoderValues, out_channels: int = 2) -> dict[str, Any]:
    """``configs/inference.json`` of an encoder: builds ``SwinUNETR`` (``out_channels`` to override) and
    loads every ``swinViT.*`` tensor strictly."""
    kwargs = swin_unetr_kwargs(values.encoder, out_channels, "instance")
    network = {"_target_": "SwinUNETR", **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    return {
        "imports": ENCODER_IMPORTS,
        "bundle_root": BUNDLE_ROOT,
        "model_path": MODEL_PATH,
        "out_channels": out_channels,
        "network_def": {**network, "out_channels": REFS["out_channels"]},
        "weights": ENCODER_WEIGHTS,
        "network": ENCODER_NETWORK,
        "initialize": [],
        "run": ENCODER_RUN,
    }
