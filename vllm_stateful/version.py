"""Versions. ``VLLM_VERSION`` is the one place vLLM is pinned: the Makefile
installs it, the connector was written against it, and the contract test
fails when a different vLLM is installed."""

__version__ = "0.1.0"
VLLM_VERSION = "0.32.0"
