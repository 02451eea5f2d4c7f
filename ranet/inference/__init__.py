"""Inference: real early exit, threshold calibration, and measuring what it buys.

``adaptive`` (early exit on cached features), ``calibration`` (thresholds for a budget),
``evaluation`` (accuracy and operating points of trained models), ``latency`` (timing every
model the same way), ``comparison`` (all of it for several models at once), ``report``
(report.json, report.md, plots), ``serving`` (exported models and their runtimes).
"""
