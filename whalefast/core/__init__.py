"""The core layer: errors, console, files, photos and sizes, the input spec, ranking maths. It imports no other layer."""
