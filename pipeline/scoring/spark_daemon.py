"""Spark's Python daemon (`spark.python.daemon.module`) with the scoring imports done once: every
worker it forks starts with torch, torchvision (the ResNet and VGG constructors), MLflow's pyfunc and
the scoring code already loaded, and shares their memory, instead of importing them each."""

import mlflow.pyfunc  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401
from pyspark import daemon

import pipeline.model.classifier  # noqa: F401
import pipeline.scoring.spark  # noqa: F401

if __name__ == "__main__":
    daemon.manager()
