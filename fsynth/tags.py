"""The MLflow tag names fsynth writes (fsynth.tune's runs) and reads (fsynth.report): one place for both."""

KIND = "fsynth.kind"  # sweep (the parent run), trial or final
SWEEP = "fsynth.sweep"  # the sweep id, on the parent and every nested run
TRAIN_NAME = "fsynth.train_name"  # the Ray Train run behind a nested run
DATASET, BASELINE, SPACE = "fsynth.dataset", "fsynth.baseline", "fsynth.space"
SEED = "fsynth.seed"  # final runs: the training seed
VALUES = "fsynth.values"  # nested runs: the sampled values (JSON)
BEST_VALUES = "fsynth.best_values"  # the parent: the values the final seeds used (JSON)
COMMAND = "fsynth.command"  # the parent: the command line that made the sweep
