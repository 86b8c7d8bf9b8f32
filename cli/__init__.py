"""lorafleet: serve thousands of LoRA adapters of one base LLM.

The subpackages live in the repository's top-level folders (engine/, kernels/, actors/, dashboard/,
loadgen/) and install under this one namespace; see docs/architecture.md.
"""

__version__ = "0.1.0"
