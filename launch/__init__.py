"""Launchers: they set the environment (TF_CONFIG, devices) and run ``ranet.train``; see README.md."""
