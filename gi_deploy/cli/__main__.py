from gi_deploy.cli import app

app()
