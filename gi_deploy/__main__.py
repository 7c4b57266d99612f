"""``python -m gi_deploy ...``: the same CLI as ``gi-deploy`` (also under ``torchrun -m gi_deploy``)."""

from gi_deploy.cli import app

app(prog_name="gi-deploy")
