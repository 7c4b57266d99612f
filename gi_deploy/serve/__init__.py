"""Serving (issue 23): ``gi-deploy serve`` on Triton's server core (PyTriton, the serve extra) and the
Triton model repository writer for full Triton servers. Above the runtime, beside explain: imports
runtime and core only, never torch."""
