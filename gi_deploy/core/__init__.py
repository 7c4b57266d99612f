"""Torch-free contracts every stage shares: preprocessing, metrics, the method registry and the
run-folder and bundle formats. Importable by everything; imports nothing above the error and I/O
basics (``gi_deploy.errors``, ``gi_deploy._io``)."""
