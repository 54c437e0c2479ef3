"""The paper's claims: verdict rules, run sets, the reproduction pipeline, experiment files."""
