"""The contenders every search stands beside: the textbook baselines as policies, GradInit and MetaInit,
and ``init_contender``, the one way any of them initializes a model."""
