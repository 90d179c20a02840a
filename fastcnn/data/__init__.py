"""Datasets and the on-device data pipeline for training."""
