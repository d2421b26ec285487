"""The data layer: synthetic data, dedup, the split, the decoded-image cache, fastai loaders and augmentation, box files. It imports only core."""
