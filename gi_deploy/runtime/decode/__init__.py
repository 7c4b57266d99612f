"""Decoding images for the models: CPU worker processes (cpu.py, the default) and nvJPEG on the GPU (gpu.py)."""
