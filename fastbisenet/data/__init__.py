"""Datasets, augmentations and the synthetic scene generator."""
