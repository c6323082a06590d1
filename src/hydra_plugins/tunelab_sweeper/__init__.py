"""Hydra plugins shipped with tunelab (Hydra only loads plugins from the hydra_plugins namespace)."""
