"""The learn layer: the trainer, its callbacks, calibration, box training and data-parallel set-up. It imports core, data, nets and runs; nothing on the inference side imports it."""
