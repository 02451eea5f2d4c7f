"""The presets: one flagfile per experiment, installed with the package as ``ranet.presets``.

Each ``<name>.cfg`` starts with the command, the hardware and the expected time and accuracy;
``python -m ranet.train --preset=<name>`` reads it from any installation, and
``--flagfile=flags/<name>.cfg`` from a checkout.
"""
