"""Datasets, augmentation presets and batching."""
