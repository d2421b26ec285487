"""The whalefast command line: thin Typer commands over the library's stages.

Each command parses its options, calls one library function and prints its answer; every error is
one line. Heavy libraries load inside the commands that need them, so --help answers at once. (No
`from __future__ import annotations`: Typer reads the shared training options' Annotated types
from a signature built at import time.)
"""

import inspect
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from whalefast import __version__
from whalefast.core.errors import WhalefastError
from whalefast.db import CATALOGUE_DB

# A deprecation notice raised inside a dependency at import time; it says nothing to a whalefast user.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


# Typer ships its own copy of click (its exceptions are not click's), so they are found through Typer's.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type) as one line on stderr, exit 2, instead of a panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `whalefast` alone, or a command group without its command
                typer.echo(e.ctx.get_help())
                sys.exit(0)
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="whalefast",
    cls=OneLineErrors,
    help="Identify individual humpback whales from fluke photos: prepare, fit, submit, match.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
catalogue_app = typer.Typer(help="Grow or inspect an arcface model's catalogue without retraining.", no_args_is_help=True)
app.add_typer(catalogue_app, name="catalogue")
boxes_app = typer.Typer(help="Fluke bounding boxes: train a box regressor that prepare --boxes can crop with.", no_args_is_help=True)
app.add_typer(boxes_app, name="boxes")

DATA = "Data"
MODEL = "Model"
TRAIN = "Training"
OUT = "Output"

DataOpt = Annotated[Path, typer.Option("--data", help="Folder in the Kaggle layout (train.csv, train/, test/).", rich_help_panel=DATA)]
PreparedOpt = Annotated[
    Path | None,
    typer.Option(
        "--prepared", help="prepare's output folder (its --out), e.g. when the data folder is read-only.", show_default="DATA/prepared", rich_help_panel=DATA
    ),
]
ModelsDirOpt = Annotated[Path, typer.Option("--models-dir", help="Where runs are saved.", rich_help_panel=OUT)]


def _version(value: bool):
    if value:
        typer.echo(f"whalefast {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
):
    """Identify individual humpback whales from fluke photos."""


def _fail(e: WhalefastError):
    from rich.text import Text

    from whalefast.core.console import console

    console.print(Text.assemble(("error:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except WhalefastError as e:
        _fail(e)
    except OSError as e:  # a full disk, an unwritable or vanished file met outside whalefast's own checks
        from whalefast.core.files import os_error_text

        _fail(WhalefastError(os_error_text(e)))


def _print_json(obj) -> None:
    from whalefast.core.files import to_json

    sys.stdout.write(to_json(obj) + "\n")


def _given(ctx: typer.Context) -> dict:
    """The options the user typed (not their defaults)."""
    typed = ("COMMANDLINE", "ENVIRONMENT")  # by name: Typer ships its own copy of click's ParameterSource
    return {k: v for k, v in ctx.params.items() if getattr(ctx.get_parameter_source(k), "name", "") in typed}


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to create the dataset in (must not hold one).")],
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    whales: Annotated[int, typer.Option(help="Catalogued individuals.")] = 300,
    train_images: Annotated[int, typer.Option(help="Training photos.")] = 2500,
    test_images: Annotated[int, typer.Option(help="Test photos.")] = 600,
):
    """Generate a synthetic fluke dataset in the Kaggle layout (the embedded demo data), with its fluke boxes."""
    from whalefast.core.console import console
    from whalefast.data.synth import SynthConfig, generate

    cfg = SynthConfig(seed=seed, whales=whales, train_images=train_images, test_images=test_images)
    path = _run(generate, out, cfg)
    console.print(f"wrote synthetic dataset to {path}")


@app.command()
def prepare(
    data: DataOpt = Path("data"),
    out: Annotated[Path | None, typer.Option(help="Where to write results.", show_default="DATA/prepared", rich_help_panel=OUT)] = None,
    boxes: Annotated[
        str | None,
        typer.Option(
            help="Crop every photo to its fluke: a boxes CSV (Image,x0,y0,x1,y1) or a box model (a folder, or NAME in --models-dir).",
            show_default="no crop",
            rich_help_panel=DATA,
        ),
    ] = None,
    models_dir: ModelsDirOpt = Path("models"),
    max_distance: Annotated[int, typer.Option(help="Merge photos whose pHashes differ in at most this many bits (0: identical).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 42,
    valid_pct: Annotated[float, typer.Option(help="Share of photos held out for validation, at most (each is one photo fewer to learn from).")] = 0.1,
    unseen_pct: Annotated[float, typer.Option(help="Share of validation photos that are unseen whales (scored as new_whale).")] = 0.3,
    min_samples: Annotated[int, typer.Option(help="Oversample ids with fewer training photos up to this count.")] = 10,
):
    """Hash and deduplicate the photos, match test to train, make an honest validation split, and choose fluke crops."""
    from whalefast.stages.prepare import PrepareConfig
    from whalefast.stages.prepare import prepare as run

    cfg = PrepareConfig(max_distance, seed, valid_pct, unseen_pct, min_samples, boxes=boxes, models_dir=str(models_dir))
    _run(run, data, out, cfg)


def _arch_help() -> str:
    from whalefast.nets.registry import ARCHS

    return "Backbone: " + ", ".join(ARCHS) + "."


def _recipe_help() -> str:
    from whalefast.runs.recipes import RECIPES

    return f"Settings that belong together ({', '.join(RECIPES)}); options you type override them. flukes: the real-photo recipe."


RecipeOpt = Annotated[str, typer.Option(help=_recipe_help(), rich_help_panel=MODEL)]
ArchOpt = Annotated[str, typer.Option(help=_arch_help(), rich_help_panel=MODEL)]
MethodOpt = Annotated[str, typer.Option(help="softmax (classifier) or arcface (embeddings + nearest catalogue photo).", rich_help_panel=MODEL)]
EpochsOpt = Annotated[int, typer.Option(help="Epochs.", rich_help_panel=TRAIN)]
BsOpt = Annotated[int, typer.Option(help="Batch size.", rich_help_panel=TRAIN)]
LrOpt = Annotated[float, typer.Option(help="Base learning rate.", rich_help_panel=TRAIN)]
MilestonesOpt = Annotated[str, typer.Option(help="Epochs after which lr is multiplied by gamma (step schedule).", rich_help_panel=TRAIN)]
GammaOpt = Annotated[float, typer.Option(help="lr factor at each milestone.", rich_help_panel=TRAIN)]
OptOpt = Annotated[str, typer.Option(help="sgd (the reference: momentum 0.9, L2 1e-4) or adam (fastai's default).", rich_help_panel=TRAIN)]
ScheduleOpt = Annotated[str, typer.Option(help="step (the reference) or one-cycle (fastai).", rich_help_panel=TRAIN)]
WD_HELP = "Weight decay: added to the gradient for sgd (the reference's 1e-4), decoupled for adam (the flukes recipe's 1.0)."
WdOpt = Annotated[float, typer.Option(help=WD_HELP, rich_help_panel=TRAIN)]
FreezeOpt = Annotated[int, typer.Option(help="Epochs training only the head first (pretrained models).", rich_help_panel=TRAIN)]
FrozenStagesOpt = Annotated[
    int, typer.Option(help="Keep the stem and this many backbone stages at their ImageNet weights (trains faster; 0: train all).", rich_help_panel=TRAIN)
]
SizeOpt = Annotated[str, typer.Option(help="Input size in pixels: N (square) or HEIGHTxWIDTH, e.g. 128x256 for aspect-true flukes.", rich_help_panel=DATA)]
PretrainedOpt = Annotated[bool, typer.Option(help="Start from ImageNet weights.", rich_help_panel=MODEL)]
NameOpt = Annotated[str | None, typer.Option(help="Run name: models/NAME/.", show_default="the recipe, or the arch for reference", rich_help_panel=OUT)]
SeedOpt = Annotated[int, typer.Option(help="Random seed.", rich_help_panel=TRAIN)]
MinSamplesOpt = Annotated[int | None, typer.Option(help="Oversample rarer ids to this count.", show_default="prepare's --min-samples", rich_help_panel=DATA)]
NewWhaleOpt = Annotated[bool, typer.Option(help="Train new_whale as a class (the reference) instead of a threshold.", rich_help_panel=MODEL)]
EmbedOpt = Annotated[int, typer.Option(help="Embedding size (arcface).", rich_help_panel=MODEL)]
MarginOpt = Annotated[
    float, typer.Option(help="Additive angular margin in radians (arcface; with --margin-power, an id with one photo's).", rich_help_panel=MODEL)
]
MARGIN_POWER_HELP = "Margins fall with an id's training photos n: floor + (margin - floor) * n^-power (arcface; Happywhale 2022's; 0: one margin for all)."
MarginPowerOpt = Annotated[float, typer.Option(help=MARGIN_POWER_HELP, rich_help_panel=MODEL)]
MarginFloorOpt = Annotated[float, typer.Option(help="The margin that ids with many photos approach (with --margin-power).", rich_help_panel=MODEL)]
ScaleOpt = Annotated[float, typer.Option(help="Logit scale (arcface).", rich_help_panel=MODEL)]
SubCentersOpt = Annotated[int, typer.Option(help="Sub-centres per id (arcface; 1: plain ArcFace).", rich_help_panel=MODEL)]
PARTS_HELP = (
    "Also cut each photo's features into this many vertical and as many horizontal strips, each embedded with its own ArcFace loss "
    "(arcface; 2: a fluke's left and right halves, upper half and trailing edge; 0: the whole photo only)."
)
PartsOpt = Annotated[int, typer.Option(help=PARTS_HELP, rich_help_panel=MODEL)]
AUGMENT_HELP = "reference (random horizontal and vertical flips) or fluke (small rotation, zoom, shift, shear, light; never mirrored)."
AugmentOpt = Annotated[str, typer.Option(help=AUGMENT_HELP, rich_help_panel=TRAIN)]
GreyOpt = Annotated[bool, typer.Option(help="Train and match on greyscale, so colour and greyscale photos look alike.", rich_help_panel=DATA)]
HeadLrOpt = Annotated[float, typer.Option(help="The head (and ArcFace's class centres) learns this many times faster than the body.", rich_help_panel=TRAIN)]
WorkersOpt = Annotated[int | None, typer.Option(help="DataLoader workers.", show_default="0 on CPU, up to 8 on GPU", rich_help_panel=TRAIN)]
CompileOpt = Annotated[bool, typer.Option(help="torch.compile the model.", rich_help_panel=TRAIN)]
MAP_EVERY_HELP = "Validation MAP@5 every N epochs and at the last (arcface embeds every training photo for it)."
MapEveryOpt = Annotated[int, typer.Option(help=MAP_EVERY_HELP, rich_help_panel=TRAIN)]
TTA_HELP = (
    "Test-time scales: catalogue, threshold and every new photo use the photo resized by each factor, the views combined, "
    "e.g. 6/7,1,8/7 (sizes round to 8 pixels)."
)
TtaScalesOpt = Annotated[str, typer.Option(help=TTA_HELP, rich_help_panel=MODEL)]
MIRROR_VIEW_HELP = "Test-time mirror view: each photo's mirror image is one more view, compared with the catalogue's mirror images (arcface, --augment fluke)."
MirrorViewOpt = Annotated[bool, typer.Option(help=MIRROR_VIEW_HELP, rich_help_panel=MODEL)]
CATALOGUE_DIMS_HELP = "Store embeddings in the catalogue projected to this many dimensions, fitted on the training photos (arcface; 0: as they are)."
CatalogueDimsOpt = Annotated[int, typer.Option(help=CATALOGUE_DIMS_HELP, rich_help_panel=MODEL)]
NEW_WHALE_SHARE_RULE = (
    "new_whale halfway between the calibrated threshold and the score that puts it first for this share of the test photos "
    "(from 100 photos; 0: the calibrated threshold alone)"
)
NewWhaleShareOpt = Annotated[float, typer.Option(help=f"Submit places {NEW_WHALE_SHARE_RULE}.", rich_help_panel=MODEL)]
REFIT_HELP = (
    "After a run on the training photos calibrated the new_whale threshold (kept in NAME/validation/), train again on every labelled photo: twice the time."
)
RefitOpt = Annotated[bool, typer.Option(help=REFIT_HELP, rich_help_panel=TRAIN)]
FOLD_IN_HELP = (
    "After a run on the training photos calibrated the new_whale threshold (kept in NAME/validation/), "
    "train its network this many epochs more on every labelled photo (0: none; with --fold-in-within, the last this many of the --epochs)."
)
FoldInOpt = Annotated[int, typer.Option(help=FOLD_IN_HELP, rich_help_panel=TRAIN)]
FOLD_IN_WITHIN_HELP = (
    "The --fold-in epochs are the last ones of the --epochs, on the same learning-rate schedule, "
    "rather than more after them at a tenth of the rate: the first run calibrates at epoch EPOCHS - FOLD_IN."
)
FoldInWithinOpt = Annotated[bool, typer.Option(help=FOLD_IN_WITHIN_HELP, rich_help_panel=TRAIN)]
MEMBERS_HELP = "Train an ensemble of this many networks, from seeds SEED, SEED+1 and so on, used as one model; each one costs a full fit."
MembersOpt = Annotated[int, typer.Option(help=MEMBERS_HELP, rich_help_panel=MODEL)]


def training_options(
    data: DataOpt = Path("data"),
    prepared: PreparedOpt = None,
    recipe: RecipeOpt = "reference",
    arch: ArchOpt = "resnet50",
    method: MethodOpt = "softmax",
    epochs: EpochsOpt = 20,
    bs: BsOpt = 128,
    lr: LrOpt = 0.01,
    milestones: MilestonesOpt = "16,19",
    gamma: GammaOpt = 0.1,
    schedule: ScheduleOpt = "step",
    opt: OptOpt = "sgd",
    wd: WdOpt = 1e-4,
    freeze_epochs: FreezeOpt = 0,
    frozen_stages: FrozenStagesOpt = 0,
    size: SizeOpt = "224",
    pretrained: PretrainedOpt = True,
    name: NameOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
    seed: SeedOpt = 42,
    min_samples: MinSamplesOpt = None,
    train_new_whale: NewWhaleOpt = False,
    embed_dim: EmbedOpt = 512,
    margin: MarginOpt = 0.3,
    margin_power: MarginPowerOpt = 0.0,
    margin_floor: MarginFloorOpt = 0.05,
    scale: ScaleOpt = 30.0,
    sub_centers: SubCentersOpt = 1,
    parts: PartsOpt = 0,
    augment: AugmentOpt = "reference",
    head_lr_mult: HeadLrOpt = 1.0,
    grey: GreyOpt = False,
    num_workers: WorkersOpt = None,
    compile: CompileOpt = False,
    map_every: MapEveryOpt = 1,
    members: MembersOpt = 1,
    tta_scales: TtaScalesOpt = "1",
    mirror_view: MirrorViewOpt = False,
    catalogue_dims: CatalogueDimsOpt = 0,
    new_whale_share: NewWhaleShareOpt = 0.0,
    refit: RefitOpt = False,
    fold_in: FoldInOpt = 0,
    fold_in_within: FoldInWithinOpt = False,
):
    """The options fit and lr-find share: a run's settings (whalefast.runs.config.FitConfig), the defaults the reference recipe's."""


TRAINING_OPTIONS = list(inspect.signature(training_options).parameters)


def with_training_options(command):
    """Give `command` (which takes ctx, its own options and **options) the shared training options after its context."""
    own = list(inspect.signature(command).parameters.values())
    shared = list(inspect.signature(training_options).parameters.values())
    params = [own[0], *shared, *(p for p in own[1:] if p.kind is not inspect.Parameter.VAR_KEYWORD)]
    command.__signature__ = inspect.Signature(params)
    return command


def _fit_config(ctx: typer.Context):
    """The run's settings from the options, --recipe filling what was not typed (one library call: FitConfig.from_options)."""
    from whalefast.runs.config import FitConfig

    typed = _given(ctx)
    options = {k: v for k, v in ctx.params.items() if k in TRAINING_OPTIONS}
    return _run(FitConfig.from_options, options, typed), {k: v for k, v in typed.items() if k in TRAINING_OPTIONS}


@app.command()
@with_training_options
def fit(
    ctx: typer.Context,
    resume: Annotated[
        bool, typer.Option(help="Continue the interrupted run NAME from its last completed epoch, with its saved settings.", rich_help_panel=TRAIN)
    ] = False,
    distributed: Annotated[bool, typer.Option(help="Train data-parallel in the processes `accelerate launch` started.", rich_help_panel=TRAIN)] = False,
    **options,
):
    """Train a model (defaults: the reference recipe, ResNet-50 at 224 px, SGD 0.01 -> x0.1 after epochs 16 and 19)."""
    from whalefast.core.console import console
    from whalefast.learn.trainer import fit as run
    from whalefast.learn.trainer import interruption_note

    cfg, typed = _fit_config(ctx)
    started = time.time()
    try:
        _run(run, cfg, resume, distributed, typed)
    except KeyboardInterrupt:
        console.print(interruption_note(cfg, started))
        raise typer.Exit(130) from None


@app.command("lr-find")
@with_training_options
def lr_find(ctx: typer.Context, **options):
    """Run fastai's learning-rate finder; print the suggestions and save the plot as PNG (weights unchanged)."""
    from whalefast.core.console import console, results, table
    from whalefast.learn.trainer import lr_find as run

    cfg, _ = _fit_config(ctx)
    result = _run(run, cfg)
    results.print(table("Suggested learning rates", ["rule", "lr"], [[k, f"{v:.2e}"] for k, v in result["suggestions"].items()]))
    console.print(f"plot saved to {result['plot']}")


ModelOpt = Annotated[str, typer.Option("--model", help="Run name in the models folder.", rich_help_panel=MODEL)]


CATALOGUE = "Catalogue"
DbOpt = Annotated[
    Path | None,
    typer.Option("--db", help="The catalogue database (SQLite).", show_default="MODELS_DIR/catalogue.db", rich_help_panel=CATALOGUE),
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", help="Match only catalogue photos with this field: KEY=VALUE (locality=Husavik); repeatable.", rich_help_panel=CATALOGUE),
]
SinceOpt = Annotated[str, typer.Option(help="Match only catalogue photos taken on or after this date (2019-07-01).", rich_help_panel=CATALOGUE)]
UntilOpt = Annotated[str, typer.Option(help="Match only catalogue photos taken on or before this date.", rich_help_panel=CATALOGUE)]
NearOpt = Annotated[str, typer.Option(help="Match only catalogue photos taken near LAT,LON (with --within-km).", rich_help_panel=CATALOGUE)]
WithinOpt = Annotated[float | None, typer.Option(help="How far from --near, in kilometres.", rich_help_panel=CATALOGUE)]

RuntimeOpt = Annotated[
    str,
    typer.Option(
        help="How the network runs: auto (ONNX Runtime on a CPU, PyTorch on a GPU), onnx, bf16 (PyTorch, bfloat16 on a CPU), or eager (PyTorch).",
        rich_help_panel=MODEL,
    ),
]


def _threshold_text(summary: dict) -> str:
    """The new_whale threshold submit used, and the calibrated one beside it where they differ."""
    used, calibrated = summary["new_whale_threshold"], summary["calibrated_threshold"]
    if used is None:
        return "none (new_whale is an id of its own)"
    return f"{used:.4f}" if used == calibrated else f"{used:.4f} ({calibrated:.4f})"


def _filter(where, since, until, near, within_km):
    from whalefast.db.filters import parse_filter

    return _run(parse_filter, where, since, until, near, within_km)


def _db(db: Path | None, models_dir: Path) -> Path:
    return db or models_dir / CATALOGUE_DB


def _curate(db: Path | None, models_dir: Path, action: str, *ids: str) -> dict:
    """merge, unmerge or rename in the catalogue database, or exit with its one-line error."""
    from whalefast.stages.catalogue import curate

    return _run(curate, _db(db, models_dir), action, *ids)


def _say(line: str) -> None:
    from whalefast.core.console import results

    results.print(line, highlight=False)


def _report_added(r: dict, results) -> None:
    for move in r["relabelled"]:
        results.print(f"relabelled {move['photo']}: {move['from']} -> {move['to']}", highlight=False)
    results.print(
        f"added {r['added_photos']} photos ({r['new_ids']} new ids), {r['unchanged_photos']} already catalogued, "
        f"{len(r['relabelled'])} relabelled; catalogue now holds {r.get('ids', r.get('individuals'))} ids, {r['photos']} photos",
        highlight=False,
    )


@app.command()
def submit(
    data: DataOpt = Path("data"),
    prepared: PreparedOpt = None,
    model: ModelOpt = "resnet50",
    models_dir: ModelsDirOpt = Path("models"),
    out: Annotated[Path, typer.Option(help="Submission file to write.", rich_help_panel=OUT)] = Path("submission.csv"),
    tta: Annotated[
        bool, typer.Option(help="Average with the horizontally flipped photo (models trained on mirrored photos; the fluke augmentation never mirrors).")
    ] = True,
    db: DbOpt = None,
    where: WhereOpt = None,
    since: SinceOpt = "",
    until: UntilOpt = "",
    near: NearOpt = "",
    within_km: WithinOpt = None,
    runtime: RuntimeOpt = "auto",
    new_whale_share: Annotated[
        float | None,
        typer.Option(
            help=f"Place {NEW_WHALE_SHARE_RULE}.",
            show_default="the model's fit --new-whale-share (the flukes recipe: 0.5)",
            rich_help_panel=OUT,
        ),
    ] = None,
):
    """Write a Kaggle submission (Image,Id with five ids) for every photo in test/."""
    from whalefast.core.console import results, table
    from whalefast.stages.submit import submit as run

    s = _run(run, data, models_dir / model, out, tta, prepared, db, _filter(where, since, until, near, within_km), runtime, new_whale_share)
    results.print(
        table(
            f"Submission written to {s['out']}",
            ["", "value"],
            [
                ["rows", s["rows"]],
                ["new_whale first", f"{s['new_whale_first']:.1%}"],
                ["new_whale threshold (calibrated)", _threshold_text(s)],
                ["hash-matched to training photos", s["hash_matched"]],
                ["mean top-1 score", f"{s['mean_top1_score']:.3f}"],
            ],
        )
    )


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Photos to identify, or folders of photos.")],
    model: ModelOpt = "resnet50",
    models_dir: ModelsDirOpt = Path("models"),
    top: Annotated[int, typer.Option(help="How many ids per photo.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    sheet: Annotated[Path | None, typer.Option(help="Save a review sheet PNG: each photo beside a catalogue photo of each match.")] = None,
    db: DbOpt = None,
    where: WhereOpt = None,
    since: SinceOpt = "",
    until: UntilOpt = "",
    near: NearOpt = "",
    within_km: WithinOpt = None,
    runtime: RuntimeOpt = "auto",
):
    """Rank the most likely whale ids for photos; unreadable photos are skipped and listed."""
    from whalefast.core.console import console, results, table, warn
    from whalefast.match.matcher import Matcher
    from whalefast.stages.predict import predict as run
    from whalefast.stages.predict import review_sheet

    photo_filter = _filter(where, since, until, near, within_km)
    matcher = _run(Matcher, models_dir / model, db=db, photo_filter=photo_filter, runtime=runtime)
    found = _run(run, images, matcher, top)
    failed = [r for r in found if "error" in r]
    if as_json:
        _print_json(found)
    else:
        for r in found:
            if "matches" in r:
                results.print(table(r["image"], ["rank", "id", "score"], [[k + 1, m["id"], f"{m['score']:.4f}"] for k, m in enumerate(r["matches"])]))
    for r in failed:
        warn(f"skipped {r['image']}: {r['error']}")
    if len(failed) == len(found):
        _fail(WhalefastError(f"none of the {len(found)} photos could be read"))
    if sheet:
        path = _run(review_sheet, found, matcher, sheet)
        console.print(f"review sheet saved to {path}")


@app.command()
def export(
    model: ModelOpt,
    models_dir: ModelsDirOpt = Path("models"),
    onnx: Annotated[bool, typer.Option("--onnx", help="Export for ONNX Runtime (model.onnx in the run folder, and its box model's).")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the run's graph here.", rich_help_panel=OUT)] = None,
):
    """Export a finished run's network for another runtime, checked to give PyTorch's outputs (predict and submit use it on a CPU)."""
    from whalefast.core.console import results, table
    from whalefast.stages.export import export_onnx

    if not onnx:
        _fail(WhalefastError("say which format to export: --onnx"))
    rows = [[s["run"], s["path"], f"{s['megabytes']:.1f}", f"{s['cosine']:.6f}"] for s in _run(export_onnx, models_dir / model, out)]
    results.print(table("Exported for ONNX Runtime", ["run", "graph", "MB", "lowest cosine to PyTorch"], rows))


@app.command()
def evaluate(
    submission: Annotated[Path, typer.Argument(help="Submission CSV (Image,Id).")],
    answers: Annotated[Path, typer.Argument(help="Ground truth CSV (Image,Id).")],
    train: Annotated[Path | None, typer.Option(help="train.csv whose ids are valid.", show_default="train.csv beside ANSWERS")] = None,
):
    """Score a submission: MAP@5 with its catalogued / new_whale breakdown."""
    from whalefast.core.console import results, table
    from whalefast.stages.evaluate import evaluate as run

    r = _run(run, submission, answers, train)
    results.print(
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
    method: MethodOpt = "arcface",
    epochs: EpochsOpt = 6,
):
    """The main job on the embedded demo data: synth, boxes fit, prepare with its fluke crops, fit, submit, evaluate; prints IoU and MAP@5."""
    from whalefast.stages.demo import run_demo

    _run(run_demo, data, models_dir, method=method, epochs=epochs)


@boxes_app.command("fit")
def boxes_fit(
    boxes: Annotated[Path, typer.Option(help="Boxes CSV: Image,x0,y0,x1,y1 in pixels of photos in train/ or test/.", rich_help_panel=DATA)],
    data: DataOpt = Path("data"),
    prepared: PreparedOpt = None,
    arch: ArchOpt = "efficientnet-lite0",
    size: Annotated[int, typer.Option(help="Square input size in pixels (the whole photo, squashed).", rich_help_panel=DATA)] = 96,
    epochs: EpochsOpt = 4,
    bs: BsOpt = 32,
    lr: LrOpt = 5e-4,
    valid_pct: Annotated[float, typer.Option(help="Share of boxed photos held out to measure IoU.", rich_help_panel=DATA)] = 0.1,
    pretrained: PretrainedOpt = True,
    seed: SeedOpt = 42,
    name: Annotated[str, typer.Option(help="Run name: models/NAME/.", rich_help_panel=OUT)] = "boxes",
    models_dir: ModelsDirOpt = Path("models"),
):
    """Train a fluke box regressor (Adam one-cycle; flips, zooms and shifts move the box with the photo) and report held-out IoU."""
    from whalefast.core.console import results, table
    from whalefast.learn.boxes import fit_boxes
    from whalefast.runs.config import BoxConfig

    cfg = BoxConfig(
        data=str(data),
        boxes=str(boxes),
        arch=arch,
        size=size,
        epochs=epochs,
        bs=bs,
        lr=lr,
        valid_pct=valid_pct,
        seed=seed,
        pretrained=pretrained,
        name=name,
        models_dir=str(models_dir),
        prepared=str(prepared) if prepared else None,
    )
    r = _run(fit_boxes, cfg)
    results.print(
        table(
            f"Box model saved to {r['run_dir']}",
            ["held-out photos", str(r["valid_photos"])],
            [
                ["mean IoU", f"{r['iou_mean']:.3f}"],
                ["median IoU", f"{r['iou_median']:.3f}"],
                ["IoU >= 0.5", f"{r['iou_at_least_0.5']:.1%}"],
                ["IoU >= 0.75", f"{r['iou_at_least_0.75']:.1%}"],
            ],
        )
    )


@catalogue_app.command("import")
def catalogue_import(
    csv: Annotated[Path, typer.Option(help="Image,Id rows of the photos, with optional Darwin Core columns (eventDate, locality, decimalLatitude, ...).")],
    images: Annotated[Path, typer.Option(help="Folder holding those photos.")],
    relabel: Annotated[bool, typer.Option(help="Move photos already catalogued under another id to the CSV's id.")] = False,
    db: DbOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
):
    """Add sightings to the catalogue database (again: nothing changes); each arcface model embeds the new photos when it next matches."""
    from whalefast.core.console import results
    from whalefast.match.catalogue import import_sightings

    _report_added(_run(import_sightings, _db(db, models_dir), csv, images, relabel), results)


@catalogue_app.command("add")
def catalogue_add(
    model: ModelOpt,
    csv: Annotated[Path, typer.Option(help="Image,Id rows of the photos to add (optional Darwin Core columns as for import).")],
    images: Annotated[Path, typer.Option(help="Folder holding those photos.")],
    relabel: Annotated[bool, typer.Option(help="Move photos already catalogued under another id to the CSV's id.")] = False,
    models_dir: ModelsDirOpt = Path("models"),
    db: DbOpt = None,
    runtime: RuntimeOpt = "auto",
):
    """Add newly identified photos (new whales or known ones) to an arcface model's catalogue and embed them now; photos already there are left alone."""
    from whalefast.core.console import results
    from whalefast.match.catalogue import add_to_catalogue

    _report_added(_run(add_to_catalogue, models_dir / model, csv, images, relabel, db, runtime), results)


@catalogue_app.command("export")
def catalogue_export(
    out: Annotated[Path, typer.Option(help="CSV to write: Image,Id, the Darwin Core columns, name, digest, source.")],
    photos: Annotated[Path | None, typer.Option(help="Also copy the photos here, one folder per individual.")] = None,
    db: DbOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
):
    """Export every identified photo with its sighting metadata (Wildbook/Flukebook, OBIS/GBIF columns), spreadsheet-safe."""
    from whalefast.core.console import results
    from whalefast.stages.catalogue import export_catalogue

    r = _run(export_catalogue, _db(db, models_dir), out, photos)
    results.print(
        f"wrote {r['photos']} photos of {r['individuals']} individuals to {r['out']}"
        + (f"; copied {r['copied']} photos to {photos}" + (f" ({r['missing']} not found on disk)" if r["missing"] else "") if photos else ""),
        highlight=False,
    )


@catalogue_app.command("show")
def catalogue_show(
    individual: Annotated[str | None, typer.Argument(help="An individual's id or alias: its sightings.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Run name: its catalogue's size and embeddings.")] = None,
    models_dir: ModelsDirOpt = Path("models"),
    db: DbOpt = None,
):
    """An individual's sightings (date, place, photographer, photo), or a summary of the catalogue (and of a model's part of it)."""
    from whalefast.core.console import results, table
    from whalefast.stages.catalogue import describe, summarise

    if individual:
        d = _run(describe, _db(db, models_dir), individual)
        title = f"{d['id']}" + (f" ({d['name']})" if d["name"] else "") + (f", also known as {', '.join(d['aliases'])}" if d["aliases"] else "")
        rows = [[s["event_date"], s["locality"], s["photographer"], s["path"]] for s in d["sightings"]]
        results.print(table(f"{title}: {len(rows)} photos", ["date", "place", "photographer", "photo"], rows))
        return
    s = _run(summarise, _db(db, models_dir), models_dir / model if model else None)
    results.print(table(f"Catalogue of {model}" if model else "Catalogue", ["", "value"], [[k, v] for k, v in s.items()]))


@catalogue_app.command("merge")
def catalogue_merge(
    keep: Annotated[str, typer.Argument(help="The id that stays.")],
    merged: Annotated[str, typer.Argument(help="The id found to be the same whale: its photos move to KEEP and it becomes an alias.")],
    db: DbOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
):
    """Merge two ids found to be one whale (recorded; undone with `catalogue unmerge`)."""
    r = _curate(db, models_dir, "merge", keep, merged)
    _say(f"merged {r['merged']} into {r['kept']}: {r['photos']} photos moved; undo with `whalefast catalogue unmerge {r['merged']}`")


@catalogue_app.command("unmerge")
def catalogue_unmerge(
    merged: Annotated[str, typer.Argument(help="An id that was merged into another.")], db: DbOpt = None, models_dir: ModelsDirOpt = Path("models")
):
    """Undo a merge: the id is an individual again, with the photos it had."""
    r = _curate(db, models_dir, "unmerge", merged)
    _say(f"{r['restored']} is an individual again, with {r['photos']} photos back from {r['from']}")


@catalogue_app.command("rename")
def catalogue_rename(
    old: Annotated[str, typer.Argument(help="The id now.")],
    new: Annotated[str, typer.Argument(help="Its new id (the old one stays an alias).")],
    db: DbOpt = None,
    models_dir: ModelsDirOpt = Path("models"),
):
    """Give an individual a new id; the old one still finds it."""
    r = _curate(db, models_dir, "rename", old, new)
    _say(f"renamed {r['from']} to {r['to']}")


@catalogue_app.command("root")
def catalogue_root(
    folder: Annotated[Path, typer.Argument(help="The folder the photos now live under.")], db: DbOpt = None, models_dir: ModelsDirOpt = Path("models")
):
    """The photos moved with their folder: read the catalogue's photo paths relative to FOLDER from now on."""
    from whalefast.core.console import results
    from whalefast.stages.catalogue import set_photo_root

    results.print(f"catalogue photos are read from under {_run(set_photo_root, _db(db, models_dir), folder)}", highlight=False)


@catalogue_app.command("history")
def catalogue_history(
    limit: Annotated[int, typer.Option(help="How many entries, newest first.")] = 50, db: DbOpt = None, models_dir: ModelsDirOpt = Path("models")
):
    """The catalogue's history: every import, relabel, merge, unmerge and rename."""
    from whalefast.core.console import results, table
    from whalefast.stages.catalogue import history

    rows = [[h["time"], h["action"], h["subject"], h["summary"]] for h in _run(history, _db(db, models_dir), limit)]
    results.print(table("Catalogue history", ["time", "action", "subject", "what"], rows))


@app.command()
def serve(
    model: ModelOpt,
    models_dir: ModelsDirOpt = Path("models"),
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the app to this machine (see the README before exposing it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Another host name the browser may use to reach the app (an authenticating reverse proxy's); repeat for several.",
            show_default="the --host address and localhost",
        ),
    ] = None,
    db: DbOpt = None,
    runtime: RuntimeOpt = "auto",
):
    """Start the match-review web app: query photos beside their best candidates, decisions and catalogue changes in the catalogue database."""
    from whalefast.review.app import serve as run

    _run(run, models_dir / model, host, port, allow_host or [], db, runtime)
