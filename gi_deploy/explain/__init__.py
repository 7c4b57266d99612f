"""Saliency maps of each source's model (the seed paper's Fig. 3): ``config`` (torch-free) and
``maps`` (Grad-CAM, Grad-CAM++, SmoothGrad on the merged torch models)."""
