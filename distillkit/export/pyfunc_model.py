"""The code of an exported MLflow model (MLflow "models from code"): it is copied into the model
folder and run by ``mlflow.pyfunc.load_model`` / ``mlflow models serve``. Not imported by
distillkit itself."""

import mlflow

from distillkit.export.pyfunc import GeneratorModel

mlflow.models.set_model(GeneratorModel())
