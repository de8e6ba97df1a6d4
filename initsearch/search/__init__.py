"""The search: settings from the Hydra config, search spaces, the Optuna storage, workers sharing a
study, one trial lifecycle (``trial.TrialRun``) for the sequential and the population runner, the study,
and its summary."""
