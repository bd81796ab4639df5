"""Datasets (TFDS builders without TensorFlow) and grain input pipelines."""
