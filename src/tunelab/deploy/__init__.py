"""Putting a trained model to work: predictions on files (`predict.py`) and an HTTP service (`serve.py`)."""
