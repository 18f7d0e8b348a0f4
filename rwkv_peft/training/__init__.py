"""Training: ``train(recipe)`` runs a recipe on Accelerate (see ``loop.py``)."""
from .loop import (TrainingDiverged, TrainingError, TrainingInterrupted, TrainingSetupError, TrainResult,
                   build_model, load_tokenizer, train)

__all__ = ["train", "TrainResult", "TrainingError", "TrainingDiverged", "TrainingInterrupted",
           "TrainingSetupError", "build_model", "load_tokenizer"]
