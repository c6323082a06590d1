"""Datasets: file loaders and the embedded datasets they read."""
