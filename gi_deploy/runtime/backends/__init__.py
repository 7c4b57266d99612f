"""The runtime's engines, one module each behind the one :class:`Backend` contract (base.py):
onnxruntime.py, tensorrt.py (the engine runner; the builder is export's), torch.py (the merged
model rebuilt from its run), and select.py, which opens a bundle on the one asked for or on the
fastest one this machine has (``auto``)."""

from gi_deploy.runtime.backends.base import Backend, cpu_threads, is_info
from gi_deploy.runtime.backends.select import nvidia_gpu_present, open_backend

__all__ = ["Backend", "cpu_threads", "is_info", "nvidia_gpu_present", "open_backend"]
