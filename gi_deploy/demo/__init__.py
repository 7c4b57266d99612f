"""``gi-deploy demo``: the whole job on synthetic data (see :mod:`gi_deploy.demo.pipeline`)."""
