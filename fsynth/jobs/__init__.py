"""The orchestration layer, and the only code that imports `ray` or `mlflow`: the Ray Data generation job, the Ray
Train worker, the Tune sweep, MLflow tracking and the experiment flow of `python -m fsynth.tune`."""
