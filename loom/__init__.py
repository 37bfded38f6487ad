"""Loom: a declarative simulator-plus-executor engine for LLM pretraining.

`loom.spec` is the language and the plan IR, `loom.simulator` costs a plan, `loom.executor` runs it,
`loom.kernels` holds the Triton kernels. This package root holds the CLI, where simulator and executor meet.
"""
__version__ = "0.1.0"
