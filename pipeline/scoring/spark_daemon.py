"""Spark's Python daemon (`spark.python.daemon.module`) with the scoring imports done once: every
worker it forks starts with torch, MLflow's pyfunc and the scoring code already loaded, and shares
their memory, instead of importing them each. torchvision, which only the ResNet and VGG
constructors need, each worker imports as it loads such a model: the workers do that side by side,
a core each, as fast as the daemon would alone, and a model without it never waits for it."""

import mlflow.pyfunc  # noqa: F401
import torch  # noqa: F401
from pyspark import daemon

import pipeline.model.classifier  # noqa: F401
import pipeline.scoring.spark  # noqa: F401

if __name__ == "__main__":
    daemon.manager()
