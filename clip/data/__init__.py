"""Datasets for training and evaluating CLIP: image-caption sources and the synthetic demo data."""
