"""The whalefast command line: thin Typer commands over the library's stages."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

# A deprecation notice raised inside a dependency at import time; it says nothing to a whalefast user.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

from whalefast import __version__
from whalefast.errors import WhalefastError

app = typer.Typer(
    name="whalefast",
    help="Identify individual humpback whales from fluke photos: prepare, fit, submit, match.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
catalogue_app = typer.Typer(help="Grow or inspect an arcface model's catalogue without retraining.", no_args_is_help=True)
app.add_typer(catalogue_app, name="catalogue")

DATA = "Data"
MODEL = "Model"
TRAIN = "Training"
OUT = "Output"

DataOpt = Annotated[Path, typer.Option("--data", help="Folder in the Kaggle layout (train.csv, train/, test/).", rich_help_panel=DATA)]
ModelsDirOpt = Annotated[Path, typer.Option("--models-dir", help="Where runs are saved.", rich_help_panel=OUT)]


def _version(value: bool):
    if value:
        typer.echo(f"whalefast {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
):
    """Identify individual humpback whales from fluke photos."""


def _fail(e: WhalefastError):
    from whalefast.console import console

    console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except WhalefastError as e:
        _fail(e)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to create the dataset in (must not hold one).")],
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    whales: Annotated[int, typer.Option(help="Catalogued individuals.")] = 300,
    train_images: Annotated[int, typer.Option(help="Training photos.")] = 2500,
    test_images: Annotated[int, typer.Option(help="Test photos.")] = 600,
):
    """Generate a synthetic fluke dataset in the Kaggle layout (the embedded demo data)."""
    from whalefast.console import console
    from whalefast.synth import SynthConfig, generate

    cfg = SynthConfig(seed=seed, whales=whales, train_images=train_images, test_images=test_images)
    path = _run(generate, out, cfg)
    console.print(f"wrote synthetic dataset to [bold]{path}[/bold]")


@app.command()
def prepare(
    data: DataOpt = Path("data"),
    out: Annotated[Optional[Path], typer.Option(help="Where to write results [default: DATA/prepared].", rich_help_panel=OUT)] = None,
    max_distance: Annotated[int, typer.Option(help="Merge photos whose pHashes differ in at most this many bits (0: identical).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 42,
    valid_pct: Annotated[float, typer.Option(help="Share of photos held out for validation, at most.")] = 0.2,
    unseen_pct: Annotated[float, typer.Option(help="Share of validation photos that are unseen whales (scored as new_whale).")] = 0.3,
    min_samples: Annotated[int, typer.Option(help="Oversample ids with fewer training photos up to this count.")] = 10,
):
    """Hash and deduplicate the photos, match test to train, and make an honest validation split."""
    from whalefast.prepare import PrepareConfig
    from whalefast.prepare import prepare as run

    _run(run, data, out, PrepareConfig(max_distance, seed, valid_pct, unseen_pct, min_samples))


def _fit_config(**kw):
    from whalefast.train import FitConfig

    kw["milestones"] = tuple(int(m) for m in kw["milestones"].split(",") if m.strip())
    kw["name"] = kw["name"] or kw["arch"]
    for key in ("data", "models_dir"):
        kw[key] = str(kw[key])
    if kw.get("min_samples") is None:
        prepared = Path(kw["data"]) / "prepared" / "prepare.json"
        kw["min_samples"] = json.loads(prepared.read_text()).get("min_samples", 10) if prepared.exists() else 10
    return FitConfig(**kw)


ArchOpt = Annotated[str, typer.Option(help="resnet18/34/50/101/152, whale-resnet or efficientnet-lite0.", rich_help_panel=MODEL)]
MethodOpt = Annotated[str, typer.Option(help="softmax (classifier) or arcface (embeddings + nearest catalogue photo).", rich_help_panel=MODEL)]
EpochsOpt = Annotated[int, typer.Option(help="Epochs.", rich_help_panel=TRAIN)]
BsOpt = Annotated[int, typer.Option(help="Batch size.", rich_help_panel=TRAIN)]
LrOpt = Annotated[float, typer.Option(help="Base learning rate.", rich_help_panel=TRAIN)]
MilestonesOpt = Annotated[str, typer.Option(help="Epochs after which lr is multiplied by gamma.", rich_help_panel=TRAIN)]
GammaOpt = Annotated[float, typer.Option(help="lr factor at each milestone.", rich_help_panel=TRAIN)]
OptOpt = Annotated[str, typer.Option(help="sgd (the reference: momentum 0.9, L2 1e-4) or adam (fastai's default).", rich_help_panel=TRAIN)]
ScheduleOpt = Annotated[str, typer.Option(help="step (the reference) or one-cycle (fastai).", rich_help_panel=TRAIN)]
FreezeOpt = Annotated[int, typer.Option(help="Epochs training only the head first (pretrained models).", rich_help_panel=TRAIN)]
SizeOpt = Annotated[int, typer.Option(help="Image size in pixels.", rich_help_panel=DATA)]
PretrainedOpt = Annotated[bool, typer.Option(help="Start from ImageNet weights.", rich_help_panel=MODEL)]
NameOpt = Annotated[Optional[str], typer.Option(help="Run name: models/NAME/ [default: the arch].", rich_help_panel=OUT)]
SeedOpt = Annotated[int, typer.Option(help="Random seed.", rich_help_panel=TRAIN)]
MinSamplesOpt = Annotated[Optional[int], typer.Option(help="Oversample rarer ids to this count [default: prepare's].", rich_help_panel=DATA)]
NewWhaleOpt = Annotated[bool, typer.Option(help="Train new_whale as a class (the reference) instead of a threshold.", rich_help_panel=MODEL)]
EmbedOpt = Annotated[int, typer.Option(help="Embedding size (arcface).", rich_help_panel=MODEL)]
MarginOpt = Annotated[float, typer.Option(help="Additive angular margin in radians (arcface).", rich_help_panel=MODEL)]
ScaleOpt = Annotated[float, typer.Option(help="Logit scale (arcface).", rich_help_panel=MODEL)]
WorkersOpt = Annotated[Optional[int], typer.Option(help="DataLoader workers [default: 0 on CPU, up to 8 on GPU].", rich_help_panel=TRAIN)]
CompileOpt = Annotated[bool, typer.Option(help="torch.compile the model.", rich_help_panel=TRAIN)]


@app.command()
def fit(
    data: DataOpt = Path("data"),
    arch: ArchOpt = "resnet50",
    method: MethodOpt = "softmax",
    epochs: EpochsOpt = 20,
    bs: BsOpt = 128,
    lr: LrOpt = 0.01,
    milestones: MilestonesOpt = "16,19",
    gamma: GammaOpt = 0.1,
    schedule: ScheduleOpt = "step",
    opt: OptOpt = "sgd",
    freeze_epochs: FreezeOpt = 0,
    size: SizeOpt = 224,
    pretrained: PretrainedOpt = True,
    name: NameOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
    seed: SeedOpt = 42,
    min_samples: MinSamplesOpt = None,
    train_new_whale: NewWhaleOpt = False,
    embed_dim: EmbedOpt = 512,
    margin: MarginOpt = 0.3,
    scale: ScaleOpt = 30.0,
    num_workers: WorkersOpt = None,
    compile: CompileOpt = False,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run NAME from its last completed epoch.", rich_help_panel=TRAIN)] = False,
    distributed: Annotated[bool, typer.Option(help="Train data-parallel in the processes `accelerate launch` started.", rich_help_panel=TRAIN)] = False,
):
    """Train a model (defaults: the reference recipe, ResNet-50 at 224 px, SGD 0.01 -> x0.1 after epochs 16 and 19)."""
    from whalefast.train import fit as run

    cfg = _run(_fit_config, **{k: v for k, v in locals().items() if k not in ("resume", "distributed", "run")})
    _run(run, cfg, resume, distributed)


@app.command("lr-find")
def lr_find(
    data: DataOpt = Path("data"),
    arch: ArchOpt = "resnet50",
    method: MethodOpt = "softmax",
    bs: BsOpt = 128,
    size: SizeOpt = 224,
    pretrained: PretrainedOpt = True,
    name: NameOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
    seed: SeedOpt = 42,
    min_samples: MinSamplesOpt = None,
    train_new_whale: NewWhaleOpt = False,
    num_workers: WorkersOpt = None,
):
    """Run fastai's learning-rate finder; print the suggestions and save the plot as PNG (weights unchanged)."""
    from whalefast.console import console, table
    from whalefast.train import lr_find as run

    cfg = _run(_fit_config, milestones="", **{k: v for k, v in locals().items() if k not in ("run", "console", "table")})
    result = _run(run, cfg)
    console.print(table("Suggested learning rates", ["rule", "lr"], [[k, f"{v:.2e}"] for k, v in result["suggestions"].items()]))
    console.print(f"plot saved to [bold]{result['plot']}[/bold]")


ModelOpt = Annotated[str, typer.Option("--model", help="Run name in the models folder.", rich_help_panel=MODEL)]


@app.command()
def submit(
    data: DataOpt = Path("data"),
    model: ModelOpt = "resnet50",
    models_dir: ModelsDirOpt = Path("models"),
    out: Annotated[Path, typer.Option(help="Submission file to write.", rich_help_panel=OUT)] = Path("submission.csv"),
    tta: Annotated[bool, typer.Option(help="Average with the horizontally flipped photo.")] = True,
):
    """Write a Kaggle submission (Image,Id with five ids) for every photo in test/."""
    from whalefast.console import console, table
    from whalefast.submit import submit as run

    s = _run(run, data, models_dir / model, out, tta)
    console.print(
        table(
            f"Submission written to {s['out']}",
            ["", "value"],
            [
                ["rows", s["rows"]],
                ["new_whale first", f"{s['new_whale_first']:.1%}"],
                ["hash-matched to training photos", s["hash_matched"]],
                ["mean top-1 score", f"{s['mean_top1_score']:.3f}"],
            ],
        )
    )


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Photos to identify.")],
    model: ModelOpt = "resnet50",
    models_dir: ModelsDirOpt = Path("models"),
    top: Annotated[int, typer.Option(help="How many ids per photo.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    sheet: Annotated[Optional[Path], typer.Option(help="Save a review sheet PNG: each photo beside a catalogue photo of each match.")] = None,
):
    """Rank the most likely whale ids for photos."""
    from whalefast.console import console, table
    from whalefast.predict import predict as run
    from whalefast.predict import review_sheet

    results = _run(run, images, models_dir / model, top)
    if as_json:
        _print_json(results)
    else:
        for r in results:
            console.print(table(r["image"], ["rank", "id", "score"], [[k + 1, m["id"], f"{m['score']:.4f}"] for k, m in enumerate(r["matches"])]))
    if sheet:
        path = _run(review_sheet, results, models_dir / model, sheet)
        console.print(f"review sheet saved to [bold]{path}[/bold]")


@app.command()
def evaluate(
    submission: Annotated[Path, typer.Argument(help="Submission CSV (Image,Id).")],
    answers: Annotated[Path, typer.Argument(help="Ground truth CSV (Image,Id).")],
    train: Annotated[Optional[Path], typer.Option(help="train.csv whose ids are valid [default: beside ANSWERS].")] = None,
):
    """Score a submission: MAP@5 with its catalogued / new_whale breakdown."""
    from whalefast.console import console, table
    from whalefast.evaluate import evaluate as run

    r = _run(run, submission, answers, train)
    console.print(
        table(
            f"Evaluation of {submission}",
            ["", "value"],
            [
                ["MAP@5", f"{r['map5']:.4f}"],
                [f"MAP@5 catalogued whales ({r['catalogued']})", f"{r['map5_catalogued']:.4f}"],
                [f"MAP@5 new_whale ({r['new_whale']})", f"{r['map5_new_whale']:.4f}"],
                ["top-1 accuracy", f"{r['top1']:.4f}"],
            ]
            + ([[f"MAP@5 ids with one training photo ({r['single_photo_ids']})", f"{r['map5_single_photo_ids']:.4f}"]] if r["single_photo_ids"] else []),
        )
    )
    typer.echo(f"MAP@5: {r['map5']:.4f}")


@app.command()
def demo(
    data: Annotated[Path, typer.Option("--data", help="Where the demo dataset lives (generated if absent).")] = Path("data/demo"),
    models_dir: ModelsDirOpt = Path("models"),
    method: MethodOpt = "softmax",
    epochs: EpochsOpt = 3,
):
    """The main job on the embedded demo data: synth, prepare, fit, submit, evaluate; prints validation and test MAP@5."""
    from whalefast.demo import run_demo

    _run(run_demo, data, models_dir, method=method, epochs=epochs)


@catalogue_app.command("add")
def catalogue_add(
    model: ModelOpt,
    csv: Annotated[Path, typer.Option(help="Image,Id rows of the photos to add.")],
    images: Annotated[Path, typer.Option(help="Folder holding those photos.")],
    models_dir: ModelsDirOpt = Path("models"),
):
    """Add newly identified photos (new whales or known ones) to an arcface model's catalogue."""
    from whalefast.catalogue import add_to_catalogue
    from whalefast.console import console

    r = _run(add_to_catalogue, models_dir / model, csv, images)
    console.print(f"added {r['added_photos']} photos ({r['new_ids']} new ids); catalogue now holds {r['ids']} ids, {r['photos']} photos")


@catalogue_app.command("show")
def catalogue_show(model: ModelOpt, models_dir: ModelsDirOpt = Path("models")):
    """Summarise an arcface model's catalogue: ids, photos, embedding size."""
    from whalefast.catalogue import load_catalogue, summarise
    from whalefast.console import console, table

    s = summarise(_run(load_catalogue, models_dir / model))
    console.print(table(f"Catalogue of {model}", ["", "value"], [[k, v] for k, v in s.items()]))
