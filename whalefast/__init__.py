"""whalefast: identify individual humpback whales from photos of their tail flukes.

The package is layered; a module imports only from its own sub-package or from a lower layer, and
never from a sibling on its own layer (tests/test_architecture.py checks it):

    core                   errors, console, files, photos and sizes, the input spec, ranking maths
    data | nets | db       data: synth, dedup, split, cache, loaders, augmentation, box files
                           nets: backbone registry, heads, losses, views, the forward path
                           db: the catalogue database (SQLite), its filters and Darwin Core columns
    runs                   settings and what a run learnt, methods, the catalogue, the run folder
    learn | match          learn: trainer, callbacks, calibration, box training, distributed
                           match: new photos, the matcher, growing the catalogue, box models
    stages                 prepare, submit, predict, evaluate, demo
    review                 the review app (logic, guard, pages)
    cli                    the Typer commands

Nothing on the inference side (match, and the stages and review above it) imports learn.
"""

__version__ = "0.1.0"

NEW_WHALE = "new_whale"
