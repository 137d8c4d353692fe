"""The ``medssl`` command line: parse, call, print. Heavy imports happen inside commands.

Exit codes: 0 success; 2 bad input or config (one line naming the file and the problem);
1 anything else (one line; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from medssl.config import EXECUTOR_KINDS, RANDOM_INIT, FinetuneConfig, ProbeRunConfig
from medssl.errors import MedsslInputError, describe_error


def _plain_flags(params: list[Any]) -> list[Any]:
    """A flag takes no value: typer's help would show it as ``<bool>`` (``--help`` included)."""
    for param in params:
        if getattr(param, "is_flag", False) and not getattr(param, "count", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="medssl",
    help="Benchmark self-supervised pretraining of 3D Swin encoders for CT/MRI segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
data_app = typer.Typer(help="Synthesise, ingest and check data.", no_args_is_help=True, cls=_Group)
app.add_typer(data_app, name="data")
config_app = typer.Typer(help="Show the configs and their defaults.", no_args_is_help=True, cls=_Group)
app.add_typer(config_app, name="config")

# --debug, and the --limit settings given on the command line (passed explicitly into every config a
# command builds: a run in a spawned worker or under torchrun does not inherit this process's state)
_state: dict[str, Any] = {"debug": False, "limits": {}, "out": None}


def _echo(message: str) -> None:
    typer.echo(message)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _show_version(value: bool) -> None:
    if value:
        from medssl.version import code_version, describe_code_version

        typer.echo(f"medssl {describe_code_version(code_version())}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    limit: list[str] = typer.Option(
        [],
        "--limit",
        help="Raise a resource limit, e.g. --limit voxels_per_volume=1e9 (see medssl/limits.py; configs "
        "also take a 'limits:' section). Applies to every run the command starts, bench runs included.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version (and commit) and exit."
    ),
) -> None:
    _state["debug"] = debug
    _state["limits"] = {}
    _set_limits(limit)  # every invocation starts from the defaults, as a fresh process would


def _set_limits(items: list[str]) -> None:
    from medssl.config import parse_override, validate_config
    from medssl.limits import Limits, set_limits

    values: dict[str, Any] = {}
    for item in items:
        path, value = parse_override(item)
        if isinstance(value, str):  # YAML reads 1e9 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        values[".".join(path)] = int(value) if isinstance(value, float) and value.is_integer() else value
    limits = validate_config(Limits, values, "--limit")
    set_limits(limits)  # this process: the config files it reads, data check, ingest, export
    _state["limits"] = {key: getattr(limits, key) for key in values}


def _with_cli_limits(data: dict[str, Any]) -> dict[str, Any]:
    """A config's ``limits`` section with the ``--limit`` settings over it (the command line wins)."""
    if not _state["limits"]:
        return data
    section = data.get("limits")
    return {**data, "limits": {**(section if isinstance(section, dict) else {}), **_state["limits"]}}


RunConfigT = TypeVar("RunConfigT", FinetuneConfig, ProbeRunConfig)  # runs of an encoder on a task


def _encoder_task_config(
    model: type[RunConfigT],
    encoder: str,
    task: Path,
    budget: str,
    seed: int,
    out: Path,
    config: Path | None,
    overrides: list[str] | None,
) -> tuple[RunConfigT, str | Path]:
    """The config of a run of ``encoder`` on ``task`` (fine-tuning, probe) from the command line: ``--config``,
    the options and overrides over it, ``--limit`` over all; its limits applied. Returns it and its source."""
    from medssl.config import apply_overrides, load_yaml, validate_config
    from medssl.limits import set_limits

    _out_folder(out)
    source: str | Path = config or "<command line>"
    data = load_yaml(config) if config else {}
    data = apply_overrides(data, [f"task={task}", f"budget={budget}", f"seed={seed}", *(overrides or [])])
    data["encoder_checkpoint"] = None if encoder.lower() == RANDOM_INIT else encoder
    cfg = validate_config(model, _with_cli_limits(data), source)
    set_limits(cfg.limits)
    return cfg, source


def _limit_overrides() -> list[str]:
    """The ``--limit`` settings as ``limits.key=value`` overrides of a benchmark config."""
    return [f"limits.{key}={value}" for key, value in _state["limits"].items()]


def _out_folder(path: Path) -> Path:
    """An ``--out`` folder: refused with one line when it, or a folder above it, is an existing file."""
    _state["out"] = str(path)
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                if ancestor == path:
                    raise MedsslInputError(path, "--out names an existing file, not a folder to write into")
                raise MedsslInputError(path, f"--out lies under {ancestor}, an existing file, not a folder")
            break
    return path


Executor = Enum("Executor", {kind: kind for kind in EXECUTOR_KINDS}, type=str)  # type: ignore[misc]  # typer's choices, from the one list


class Modality(str, Enum):
    ct = "ct"
    mri = "mri"


class LabelStyle(str, Enum):
    regions = "regions"
    plain = "plain"


class ExportFormat(str, Enum):
    monai = "monai"
    monai_bundle = "monai-bundle"


OVERRIDES = typer.Argument(None, help="Config overrides, e.g. schedule.steps=100 encoder.preset=base")
OUT_HELP = "Output directory (created; an existing file is refused)."
ENCODER_HELP = (
    "Encoder checkpoint: a medssl encoder.pt, a MONAI SwinUNETR (or SwinTransformer) state dict, or "
    "research-contributions' self-supervised model_swinvit.pt (MONAI/SuPreM/SwinUNETR-v2 layouts: the encoder's "
    f"size is read from its tensors; see the README); or '{RANDOM_INIT}' for random init."
)


class ConfigKind(str, Enum):
    pretrain = "pretrain"
    finetune = "finetune"
    bench = "bench"


# --------------------------------------------------------------------------- the study


@app.command(cls=_Command)
def demo(out: Path = typer.Option(Path("medssl-demo"), "--out", help=OUT_HELP)) -> None:
    """Run the embedded demo benchmark (configs/demo.yaml) end to end, report included."""
    from medssl.bench import demo_config_path, run_bench

    failed = run_bench(demo_config_path(), _out_folder(out), overrides=_limit_overrides())
    _echo(f"report: {out / 'report' / 'index.html'}")
    if failed:
        raise typer.Exit(1)


@app.command(cls=_Command)
def bench(
    config: Path = typer.Argument(..., help="Benchmark YAML."),
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("medssl-bench"), "--out", help=OUT_HELP),
    executor: Executor | None = typer.Option(None, "--executor", help="Override the config's executor."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its estimated cost; run nothing."),
    as_json: bool = typer.Option(
        False, "--json", help="With --dry-run: the plan as one JSON object (runs with their resolved configs)."
    ),
) -> None:
    """Expand a benchmark YAML into runs, run what is unfinished, and write the report."""
    from medssl.bench import run_bench

    failed = run_bench(
        config,
        _out_folder(out),
        executor=executor.value if executor else None,
        overrides=[*(overrides or []), *_limit_overrides()],
        dry_run=dry_run,
        as_json=as_json,
    )
    if not dry_run:
        _echo(f"report: {out / 'report' / 'index.html'}")
    if failed:
        raise typer.Exit(1)


@app.command(cls=_Command)
def pretrain(
    method: str = typer.Option(..., "--method", help="Registered method name (see 'medssl methods')."),
    corpus: Path = typer.Option(
        ..., "--corpus", help="Ingested corpus directory ('medssl data ingest SCANS --out CORPUS')."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory (created; an existing file is refused)."),
    config: Path | None = typer.Option(None, "--config", help="PretrainConfig YAML (e.g. configs/methods/dino.yaml)."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Pretrain one encoder with one SSL method."""
    from medssl.config import PretrainConfig, apply_overrides, load_yaml, validate_config
    from medssl.limits import check_batch_size, set_limits
    from medssl.train.pretrain import run_pretrain

    _out_folder(out)
    source = config or "<command line>"
    data = load_yaml(config) if config else {}
    data = apply_overrides(data, [f"method.name={method}", f"corpus={corpus}", *(overrides or [])])
    cfg = validate_config(PretrainConfig, _with_cli_limits(data), source)
    set_limits(cfg.limits)
    check_batch_size(cfg.schedule.batch_size, source)
    _refuse_raw_corpus(corpus, cfg.preprocess)  # before the run folder is touched
    results = run_pretrain(cfg, out)
    _echo(f"encoder: {out / results['encoder']}  (final loss {results.get('final_loss')})")
    if results.get("health", {}).get("collapsed"):
        _echo(f"WARNING: collapse: {results['health']['reason']}")


@app.command(cls=_Command)
def finetune(
    task: Path = typer.Option(..., "--task", help="MSD / nnU-Net task folder."),
    encoder: str = typer.Option(..., "--encoder", help=ENCODER_HELP),
    budget: str = typer.Option("all", "--budget", help="Number of training cases, or 'all'."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the initialisation and the data order."),
    out: Path = typer.Option(..., "--out", help="Run directory (created; an existing file is refused)."),
    config: Path | None = typer.Option(None, "--config", help="FinetuneConfig YAML ('medssl config show finetune')."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Fine-tune an encoder in the SwinUNETR-style segmenter on one task."""
    from medssl.limits import check_batch_size
    from medssl.train.finetune import run_finetune

    cfg, source = _encoder_task_config(FinetuneConfig, encoder, task, budget, seed, out, config, overrides)
    check_batch_size(cfg.schedule.batch_size, source)
    _warn_if_upsampled_task(cfg, out)
    results = run_finetune(cfg, out)
    dice = [r["dice"] for r in results.get("cases", [])]
    mean = sum(dice) / len(dice) if dice else float("nan")
    _echo(
        f"test Dice {mean:.3f} over {len({r['case'] for r in results.get('cases', [])})} cases; "
        f"results: {out / 'results.json'}"
    )


@app.command(cls=_Command)
def probe(
    encoder: str = typer.Argument(
        ..., help=f"Encoder checkpoint (or a fine-tuned best.pt: its encoder), or '{RANDOM_INIT}' for random init."
    ),
    task: Path = typer.Option(..., "--task", help="MSD / nnU-Net task folder."),
    budget: str = typer.Option("all", "--budget", help="Training cases for the probe head, or 'all'."),
    seed: int = typer.Option(0, "--seed", help="The split's seed (and random init's)."),
    out: Path = typer.Option(..., "--out", help="Run directory (created; an existing file is refused)."),
    config: Path | None = typer.Option(None, "--config", help="ProbeRunConfig YAML (fields of a probe run)."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Frozen-encoder probe: a light head on the encoder's multi-scale features (every Swin output upsampled
    to voxels), trained on the budget's cases and scored with Dice on the split's test cases. Give the
    fine-tuning runs' splits.json (splits_path=...) and preprocessing to score on their test cases."""
    from medssl.analysis.probe_run import run_probe

    cfg, _ = _encoder_task_config(ProbeRunConfig, encoder, task, budget, seed, out, config, overrides)
    results = run_probe(cfg, out)
    _echo(
        f"probe test Dice {results.get('mean_dice', float('nan')):.3f} over "
        f"{len({r['case'] for r in results.get('cases', [])})} cases; results: {out / 'results.json'}"
    )


@app.command(cls=_Command)
def report(
    runs_dir: Path = typer.Argument(..., help="A folder of run directories (e.g. <bench out>/runs)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Report directory (default: next to RUNS_DIR): new, empty, or an earlier report of medssl's; "
        "the report writes and replaces only its own files there.",
    ),
) -> None:
    """Build the report (index.html, report.md, tables, figures) from run directories alone."""
    from medssl.report import build_report, default_out_dir

    if not runs_dir.is_dir():
        raise MedsslInputError(runs_dir, "not a directory of runs")
    index = build_report(runs_dir, _out_folder(out) if out is not None else default_out_dir(runs_dir))
    provenance = json.loads((index.parent / "provenance.json").read_text(encoding="utf-8"))
    for item in provenance.get("skipped") or []:  # symlinks out of RUNS_DIR, impossible values, ...
        _echo(f"skipped {item.get('run_id')}: {item.get('reason')}")
    _echo(f"report: {index}")


@app.command(cls=_Command)
def cka(
    ckpt_a: Path = typer.Argument(..., help="Encoder or fine-tuned checkpoint A."),
    ckpt_b: Path = typer.Argument(..., help="Encoder or fine-tuned checkpoint B."),
    task: Path = typer.Option(..., "--task", help="Task folder whose validation crops are used."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
) -> None:
    """Layer-wise CKA between two encoders on fixed crops of a task."""
    from medssl.analysis.cka_run import run_cka
    from medssl.config import CKARunConfig, validate_config

    _out_folder(out)
    data = {"model_a": ckpt_a.resolve(), "model_b": ckpt_b.resolve(), "task": task.resolve()}
    results = run_cka(validate_config(CKARunConfig, _with_cli_limits(data), "<command line>"), out)
    _echo(f"reuse per stage: {results.get('reuse')}; matrices: {out / 'results.json'}")


@app.command(cls=_Command)
def export(
    ckpt: Path = typer.Argument(..., help="Encoder checkpoint (or, for monai-bundle, a fine-tuned best.pt)."),
    format: ExportFormat = typer.Option(
        ExportFormat.monai,
        "--format",
        help="monai: a state dict MONAI's SwinUNETR loads; monai-bundle: a MONAI bundle folder.",
    ),
    out: Path = typer.Option(..., "--out", help="Output .pt file (monai) or bundle directory (monai-bundle)."),
) -> None:
    """Export an encoder as a state dict MONAI's SwinUNETR loads (every swinViT.* key present; the SwinUNETR
    arguments that load it are printed), or an encoder or fine-tuned segmenter as a MONAI bundle."""
    from medssl.export import export_bundle, export_monai, run_command

    if format is ExportFormat.monai_bundle:
        bundle, kind = export_bundle(ckpt, out)
        _echo(f"wrote a MONAI bundle ({kind}) to {bundle}")
        if kind == "segmenter":
            _echo(f"run it (from any folder, after moving it too): {run_command(bundle)}")
        return
    exported = export_monai(ckpt, out)
    _echo(f"wrote {exported.tensors} swinViT.* tensors to {out}; they load into")
    _echo(f"  monai.networks.nets.{exported.constructor()}  # out_channels: your number of classes")
    _echo(f"  net.load_state_dict(torch.load({str(out)!r}, weights_only=True), strict=False)  # the decoder stays")


@app.command(cls=_Command)
def methods() -> None:
    """List the registered SSL methods: name, family, description."""
    from rich.console import Console
    from rich.table import Table

    from medssl.methods import REGISTRY

    table = Table("name", "family", "description")
    for name, cls in sorted(REGISTRY.items(), key=lambda kv: (kv[1].family, kv[0])):
        table.add_row(name, cls.family, cls.description)
    Console(width=140).print(table)


# --------------------------------------------------------------------------- configs


@config_app.command("show", cls=_Command)
def config_show(
    kind: ConfigKind = typer.Argument(..., help="Which config: pretrain, finetune or bench."),
) -> None:
    """Print every field of a config with its default, as YAML a --config file (or a bench YAML) takes."""
    typer.echo(_default_config_yaml(kind), nl=False)


def _default_config_yaml(kind: ConfigKind) -> str:
    """The defaults of one config model as YAML that validates back into it, under a comment header."""
    from medssl.config import (
        ENCODER_PRESETS,
        BenchConfig,
        BenchDataConfig,
        BenchTaskConfig,
        FinetuneConfig,
        PretrainConfig,
        StrictModel,
        SynthDataConfig,
    )
    from medssl.version import __version__

    model: StrictModel
    if kind is ConfigKind.pretrain:
        model = PretrainConfig()
        use = "medssl pretrain --method NAME --corpus DIR --out RUN --config FILE (the options set method and corpus)"
    elif kind is ConfigKind.finetune:
        model = FinetuneConfig()
        use = "medssl finetune --task DIR --encoder CKPT --out RUN --config FILE (the options set task and encoder)"
    else:
        # data.synth: null means these same defaults; shown so that every field is there to edit
        model = BenchConfig(
            tasks=[BenchTaskConfig(path="synth:ct_organs")], data=BenchDataConfig(synth=SynthDataConfig())
        )
        use = "medssl bench FILE --out DIR ('tasks' has no default: one synthetic task stands in for yours)"
    header = (
        f"# medssl {__version__}: every field of {type(model).__name__} with its default.\n"
        f"# Use: {use}.\n"
        "# A file needs only the fields it changes; key=value overrides on the command line take the same paths.\n"
    )
    data = model.model_dump(mode="json")
    # The encoder's size fields default to null, "from the preset": printed filled in, a file that then
    # changed only the preset would keep the tiny sizes.
    data["encoder"].update(dict.fromkeys(ENCODER_PRESETS[data["encoder"]["preset"]]))
    return header + yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False)


class _FlowListDumper(yaml.SafeDumper):
    """Lists of plain values on one line (``depths: [2, 2, 2, 2]``), as the configs in configs/ write them."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flow = all(not isinstance(item, dict | list) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _FlowListDumper.represent_list)


# --------------------------------------------------------------------------- data


@data_app.command("synth", cls=_Command)
def data_synth(
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    modality: Modality | None = typer.Option(None, "--modality", help="Only CT or only MRI data."),
    cases: int = typer.Option(16, "--cases", min=4, help="Cases per labeled task (and in the corpus)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantoms (the same seed writes the same data)."),
) -> None:
    """Synthesise phantoms: an unlabeled CT corpus and CT/MRI tasks in the MSD layout."""
    from medssl.data.synth import synth_all

    made = synth_all(
        _out_folder(out), cases=cases, corpus_cases=cases, seed=seed, modality=modality.value if modality else None
    )
    for name, path in made.items():
        _echo(f"{name}: {path}")
    if "corpus" in made:
        _echo(f"the corpus is raw scans; before pretraining: {_ingest_command(made['corpus'])}")


@data_app.command("ingest", cls=_Command)
def data_ingest(
    src: list[Path] = typer.Argument(..., help="Folders or files of scans (NIfTI, NRRD, MHA, DICOM, .inv3)."),
    out: Path = typer.Option(..., "--out", help="Corpus directory to create or extend."),
    config: Path | None = typer.Option(None, "--config", help="PreprocessConfig YAML."),
    overrides: list[str] = typer.Option([], "--set", help="Preprocessing overrides, e.g. --set spacing=[2,2,2]"),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=256,
        help="Scans decoded in parallel (processes). A killed ingest resumes: cached scans are not decoded again.",
    ),
    cache_format: str = typer.Option(
        "npy",
        "--cache-format",
        help=escape("npy (fastest reads) or blosc2 (compressed; pip install 'medssl[blosc2]')."),
    ),
) -> None:
    """Preprocess a folder of scans into a pretraining corpus with a manifest."""
    from medssl.config import PreprocessConfig, load_config
    from medssl.data.corpus import ingest_corpus
    from medssl.data.footprint import IMAGE_BYTES_PER_VOXEL, resampling_footprint
    from medssl.data.readers import find_volumes

    _out_folder(out)
    pre = load_config(PreprocessConfig, config, overrides)
    scans = [scan for path in src if path.exists() for scan in find_volumes(path)]
    footprint = resampling_footprint(scans, pre.spacing, IMAGE_BYTES_PER_VOXEL)
    if footprint is not None and footprint.far_larger:
        _warn(
            f"{footprint.describe()}; each crop then covers fewer millimetres and ingest takes longer. "
            f"To keep the scans' own voxel size: --set spacing={_spacing_text(footprint.median_spacing_before)}"
        )
    corpus = ingest_corpus(list(src), out, pre, workers=workers, image_format=cache_format)
    skipped = getattr(corpus, "skipped", [])
    _echo(f"corpus: {out} ({len(corpus)} volumes, {len(skipped)} skipped)")
    for item in skipped:
        _echo(f"skipped {item['source']}: {item['problem']}")


@data_app.command("check", cls=_Command)
def data_check(path: Path = typer.Argument(..., help="A task folder, a folder of scans, or one volume.")) -> None:
    """List every problem in a task folder or scan folder, one per line."""
    from medssl.data.tasks import check_path

    if not path.exists():
        raise MedsslInputError(path, "no such file or directory")
    try:
        problems = check_path(path)
    except MemoryError:
        raise MedsslInputError(path, "too large to check in this machine's memory (see 'medssl --limit')") from None
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{len(problems)} problem(s) found in {path}", err=True)
        raise typer.Exit(2)
    _echo(f"ok: {path}")


@data_app.command("convert", cls=_Command)
def data_convert(
    kind: str = typer.Argument(..., help="btcv, amos, kits, brats, hanseg or msd (see the README's table)."),
    src: Path = typer.Argument(..., help="The dataset folder as it ships."),
    out: Path = typer.Option(..., "--out", help="nnU-Net v2 raw folder to write (or resume)."),
    modality: Modality | None = typer.Option(None, "--modality", help="AMOS: convert its CT or its MRI cases."),
    labels: LabelStyle | None = typer.Option(
        None,
        "--labels",
        help="BraTS, KiTS: declare nnU-Net's regions (default; trained with a sigmoid per region, Dice per "
        "region) or the plain classes.",
    ),
) -> None:
    """Convert a public dataset's own layout into the nnU-Net v2 raw layout (resumable)."""
    from medssl.data.convert import convert_dataset

    summary = convert_dataset(
        kind,
        src,
        _out_folder(out),
        modality=modality.value if modality else None,
        progress=lambda case: _echo(f"converted {case}"),
        label_style=labels.value if labels else None,
    )
    for line in summary.skipped:
        _echo(f"skipped {line}")
    for case in summary.removed:
        _echo(f"removed {case}: no longer in the source")
    _echo(
        f"{out}: {summary.n_training} cases ({len(summary.converted)} converted, "
        f"{len(summary.resumed)} already done); check with 'medssl data check {out}'"
    )


# --------------------------------------------------------------------------- checks before a run


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _spacing_text(spacing: Any) -> str:
    return "[" + ",".join(f"{float(s):.3g}" for s in spacing) + "]"


def _ingest_command(scans: Path, preprocess: Any = None) -> str:
    """The exact ``medssl data ingest`` command for a folder of scans (non-default preprocessing kept)."""
    from medssl.config import PreprocessConfig

    target = scans.with_name(scans.name + "-ingested")
    command = ["medssl", "data", "ingest", str(scans), "--out", str(target)]
    if preprocess is not None:
        defaults = PreprocessConfig().model_dump(mode="json")
        for key, value in preprocess.model_dump(mode="json").items():
            if value != defaults[key]:
                command += ["--set", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return shlex.join(command)


def _refuse_raw_corpus(corpus: Path, preprocess: Any) -> None:
    """``--corpus`` given a folder of scans: exit 2 with the exact ingest command.

    Not ingested on the spot: a corpus is ingested once and shared by every method's pretraining (the
    cache is the study's largest data, and its spacing fixes what every encoder sees); an ingest inside
    each pretraining run would repeat it per method inside each run folder."""
    from medssl.data.corpus import MANIFEST_NAME
    from medssl.data.readers import find_volumes

    if not corpus.is_dir() or (corpus / MANIFEST_NAME).is_file() or not find_volumes(corpus):
        return  # an ingested corpus, or not one at all: the corpus reader says what is wrong
    target = corpus.with_name(corpus.name + "-ingested")
    raise MedsslInputError(
        corpus,
        f"a folder of scans, not an ingested corpus; ingest it once (every method then pretrains on the same "
        f"cache): {_ingest_command(corpus, preprocess)} and pretrain with --corpus {shlex.quote(str(target))}",
    )


def _warn_if_upsampled_task(cfg: Any, out: Path) -> None:
    """Before a fine-tune starts: resampling far finer than the task's scans makes every step, validation
    and test prediction slow; say by how much, and how large the cache gets."""
    from medssl.data.footprint import IMAGE_BYTES_PER_VOXEL, LABEL_BYTES_PER_VOXEL, resampling_footprint
    from medssl.data.tasks import load_task
    from medssl.runs import RunDir

    if cfg.task is None or RunDir(out).is_finished():
        return
    task = load_task(cfg.task)  # bad input exits 2 here, before the run folder is touched
    per_voxel = IMAGE_BYTES_PER_VOXEL * task.n_channels + LABEL_BYTES_PER_VOXEL
    footprint = resampling_footprint([case.image for case in task.cases], cfg.preprocess.spacing, per_voxel)
    if footprint is None or not footprint.far_larger:
        return
    _warn(
        f"{task.root}: {footprint.describe()}. Every training step, validation and test prediction works on "
        f"the resampled volumes, so even this {cfg.schedule.steps}-step fine-tune will be slow. To keep the scans' "
        f"own voxel size: preprocess.spacing={_spacing_text(footprint.median_spacing_before)}"
    )


def _disk_full(err: BaseException) -> OSError | None:
    """The disk-full error behind ``err`` (itself, or what it was raised from), if any."""
    from medssl.fileio import is_disk_full

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if is_disk_full(current):
            assert isinstance(current, OSError)
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main() -> None:
    """Console-script entry: one-line errors, exit 2 for bad input, 1 for anything else."""
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit raised by a command
        code = code if isinstance(code, int) else 0
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            typer.echo("interrupted: finished runs are kept; run the same command again to resume", err=True)
        sys.exit(code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except MedsslInputError as err:
        if _state["debug"]:
            raise
        for line in err.lines():  # one per problem: a config with two bad fields gives two lines
            typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished runs are kept; run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place that turns any failure into one line
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):  # click's usage errors
            typer.echo(f"error: {err.format_message()}", err=True)
            sys.exit(2)
        if _state["debug"]:
            raise
        disk_full = _disk_full(err)
        if disk_full is not None:
            where = disk_full.filename or _state.get("out") or "the output folder's disk"
            typer.echo(
                f"error: no space left on {where}: free some space there and run the same command again "
                "(everything finished before is kept; an interrupted run resumes from its last checkpoint)",
                err=True,
            )
            sys.exit(1)
        typer.echo(f"error: {describe_error(err, limit=450)} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
