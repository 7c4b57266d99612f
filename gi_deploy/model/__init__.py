"""The torch side of adapters, split the way peft splits a method: settings (``settings``), the
pure merge maths (``merge``), each adapter kind (``lora``, ``colora``) registered in ``adapters``,
the base model and its fingerprint (``base``), and loading a run's models (``run``). Importing this
package imports nothing; its modules import torch."""
