"""Training workflow: point-in-time training sets, model training and model artifacts."""
