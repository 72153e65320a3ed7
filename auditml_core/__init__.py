"""The library layer: config, data, models, the training core, the DP seam, seeds, artifacts.

It knows nothing of Flower or of pipeline stages (see ARCHITECTURE.md).
"""
