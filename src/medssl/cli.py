"""The ``medssl`` command line: parse, call, print. Heavy imports happen inside commands.

Exit codes: 0 success; 2 bad input or config (one line naming the file and the problem);
1 anything else (one line; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path

import typer

from medssl.config import EXECUTOR_KINDS, RANDOM_INIT
from medssl.errors import MedsslInputError, describe_error

app = typer.Typer(
    name="medssl",
    help="Benchmark self-supervised pretraining of 3D Swin encoders for CT/MRI segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Synthesise, ingest and check data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"debug": False}


def _echo(message: str) -> None:
    typer.echo(message)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    limit: list[str] = typer.Option(
        [],
        "--limit",
        help="Raise a resource limit, e.g. --limit voxels_per_volume=1e9 "
        "(see medssl/limits.py; configs also take a 'limits:' section).",
    ),
) -> None:
    _state["debug"] = debug
    if limit:
        _set_limits(limit)


def _set_limits(items: list[str]) -> None:
    from medssl.config import parse_override, validate_config
    from medssl.limits import Limits, set_limits

    values = {}
    for item in items:
        path, value = parse_override(item)
        if isinstance(value, str):  # YAML reads 1e9 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        values[".".join(path)] = int(value) if isinstance(value, float) and value.is_integer() else value
    set_limits(validate_config(Limits, values, "--limit"))


Executor = Enum("Executor", {kind: kind for kind in EXECUTOR_KINDS}, type=str)  # typer's choices


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


# --------------------------------------------------------------------------- the study


@app.command()
def demo(out: Path = typer.Option(Path("medssl-demo"), "--out", help="Output directory.")) -> None:
    """Run the embedded demo benchmark (configs/demo.yaml) end to end, report included."""
    from medssl.bench import demo_config_path, run_bench

    failed = run_bench(demo_config_path(), out)
    _echo(f"report: {out / 'report' / 'index.html'}")
    if failed:
        raise typer.Exit(1)


@app.command()
def bench(
    config: Path = typer.Argument(..., help="Benchmark YAML."),
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("medssl-bench"), "--out", help="Output directory."),
    executor: Executor | None = typer.Option(None, "--executor", help="Override the config's executor."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its estimated cost; run nothing."),
) -> None:
    """Expand a benchmark YAML into runs, run what is unfinished, and write the report."""
    from medssl.bench import run_bench

    failed = run_bench(
        config, out, executor=executor.value if executor else None, overrides=list(overrides or []), dry_run=dry_run
    )
    if not dry_run:
        _echo(f"report: {out / 'report' / 'index.html'}")
    if failed:
        raise typer.Exit(1)


@app.command()
def pretrain(
    method: str = typer.Option(..., "--method", help="Registered method name (see 'medssl methods')."),
    corpus: Path = typer.Option(..., "--corpus", help="Ingested corpus directory ('medssl data ingest')."),
    out: Path = typer.Option(..., "--out", help="Run directory."),
    config: Path | None = typer.Option(None, "--config", help="PretrainConfig YAML (e.g. configs/methods/dino.yaml)."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Pretrain one encoder with one SSL method."""
    from medssl.config import PretrainConfig, apply_overrides, load_yaml, validate_config
    from medssl.train.pretrain import run_pretrain

    data = load_yaml(config) if config else {}
    data = apply_overrides(data, [f"method.name={method}", f"corpus={corpus}", *(overrides or [])])
    cfg = validate_config(PretrainConfig, data, config or "<command line>")
    results = run_pretrain(cfg, out)
    _echo(f"encoder: {out / results['encoder']}  (final loss {results.get('final_loss')})")
    if results.get("health", {}).get("collapsed"):
        _echo(f"WARNING: collapse: {results['health']['reason']}")


@app.command()
def finetune(
    task: Path = typer.Option(..., "--task", help="MSD / nnU-Net task folder."),
    encoder: str = typer.Option(..., "--encoder", help=f"Encoder checkpoint, or '{RANDOM_INIT}' for random init."),
    budget: str = typer.Option("all", "--budget", help="Number of training cases, or 'all'."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="Run directory."),
    config: Path | None = typer.Option(None, "--config", help="FinetuneConfig YAML."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Fine-tune an encoder in the SwinUNETR-style segmenter on one task."""
    from medssl.config import FinetuneConfig, apply_overrides, load_yaml, validate_config
    from medssl.train.finetune import run_finetune

    data = load_yaml(config) if config else {}
    data = apply_overrides(data, [f"task={task}", f"budget={budget}", f"seed={seed}", *(overrides or [])])
    data["encoder_checkpoint"] = None if encoder.lower() == RANDOM_INIT else encoder
    cfg = validate_config(FinetuneConfig, data, config or "<command line>")
    results = run_finetune(cfg, out)
    dice = [r["dice"] for r in results.get("cases", [])]
    mean = sum(dice) / len(dice) if dice else float("nan")
    _echo(
        f"test Dice {mean:.3f} over {len({r['case'] for r in results.get('cases', [])})} cases; "
        f"results: {out / 'results.json'}"
    )


@app.command()
def report(
    runs_dir: Path = typer.Argument(..., help="A folder of run directories (e.g. <bench out>/runs)."),
    out: Path | None = typer.Option(None, "--out", help="Report directory (default: next to RUNS_DIR)."),
) -> None:
    """Build the report (index.html, report.md, tables, figures) from run directories alone."""
    from medssl.report import build_report, default_out_dir

    if not runs_dir.is_dir():
        raise MedsslInputError(runs_dir, "not a directory of runs")
    index = build_report(runs_dir, out or default_out_dir(runs_dir))
    _echo(f"report: {index}")


@app.command()
def cka(
    ckpt_a: Path = typer.Argument(..., help="Encoder or fine-tuned checkpoint A."),
    ckpt_b: Path = typer.Argument(..., help="Encoder or fine-tuned checkpoint B."),
    task: Path = typer.Option(..., "--task", help="Task folder whose validation crops are used."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
) -> None:
    """Layer-wise CKA between two encoders on fixed crops of a task."""
    from medssl.analysis.cka_run import run_cka
    from medssl.config import CKARunConfig, validate_config

    paths = {"model_a": ckpt_a.resolve(), "model_b": ckpt_b.resolve(), "task": task.resolve()}
    results = run_cka(validate_config(CKARunConfig, paths, "<command line>"), out)
    _echo(f"reuse per stage: {results.get('reuse')}; matrices: {out / 'results.json'}")


@app.command()
def export(
    ckpt: Path = typer.Argument(..., help="Encoder checkpoint (or, for monai-bundle, a fine-tuned best.pt)."),
    format: ExportFormat = typer.Option(ExportFormat.monai, "--format"),
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


@app.command()
def methods() -> None:
    """List the registered SSL methods: name, family, description."""
    from rich.console import Console
    from rich.table import Table

    from medssl.methods import REGISTRY

    table = Table("name", "family", "description")
    for name, cls in sorted(REGISTRY.items(), key=lambda kv: (kv[1].family, kv[0])):
        table.add_row(name, cls.family, cls.description)
    Console(width=140).print(table)


# --------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Output directory."),
    modality: Modality | None = typer.Option(None, "--modality", help="Only CT or only MRI data."),
    cases: int = typer.Option(16, "--cases", min=4, help="Cases per labeled task (and in the corpus)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Synthesise phantoms: an unlabeled CT corpus and CT/MRI tasks in the MSD layout."""
    from medssl.data.synth import synth_all

    made = synth_all(out, cases=cases, corpus_cases=cases, seed=seed, modality=modality.value if modality else None)
    for name, path in made.items():
        _echo(f"{name}: {path}")


@data_app.command("ingest")
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
        "npy", "--cache-format", help="npy (fastest reads) or blosc2 (compressed; pip install 'medssl[blosc2]')."
    ),
) -> None:
    """Preprocess a folder of scans into a pretraining corpus with a manifest."""
    from medssl.config import PreprocessConfig, load_config
    from medssl.data.corpus import ingest_corpus

    pre = load_config(PreprocessConfig, config, overrides)
    corpus = ingest_corpus(list(src), out, pre, workers=workers, image_format=cache_format)
    skipped = getattr(corpus, "skipped", [])
    _echo(f"corpus: {out} ({len(corpus)} volumes, {len(skipped)} skipped)")
    for item in skipped:
        _echo(f"skipped {item['source']}: {item['problem']}")


@data_app.command("check")
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


@data_app.command("convert")
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
        out,
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
        typer.echo(f"error: {describe_error(err, limit=450)} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
