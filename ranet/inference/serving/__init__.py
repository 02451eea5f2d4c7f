"""Serving: exported models and what runs them.

``exporting`` (options, checks, thresholds, atomic writes shared by every format),
``saved_model`` (a SavedModel for TF Serving with real early exit).
"""
