"""The library users call from their own training code: init schemes, layer discovery, the policy file,
``apply_policy``, LSUV, diagnostics and seeding. Imports only torch, numpy and ``initsearch.errors``."""
