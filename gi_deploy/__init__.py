"""gi-deploy: per-source LoRA classifiers for gastrointestinal endoscopy.

Importing the package (and ``gi_deploy.runtime``) never imports torch, so a runtime-only
install can run ``gi-deploy infer``.
"""

__version__ = "0.1.0"
