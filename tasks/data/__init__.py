"""Data: the Fu world, fonts, the online-stream simulator, manifest, ImageFolder loading,
preprocessing, Great Expectations validation, DVC versions."""
