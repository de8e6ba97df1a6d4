"""MLflow tracking: it observes the search (``search.outcome.Tracker``) and never steers it. Nothing is
imported here: the writer process (``python -m initsearch.tracking.writer``) loads this package."""
