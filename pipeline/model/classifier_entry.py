"""The classifier as code: MLflow logs this file and runs it on load, so no pickled object is
stored or unpickled (MLflow's "models from code")."""

from mlflow.models import set_model

from pipeline.model.classifier import CifarClassifier

set_model(CifarClassifier())
