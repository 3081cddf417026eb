"""Engine side of vllm-stateful: what runs inside vLLM's engine-core and
worker processes (the KV connector and its pin table). It shares nothing with
the API side but ``vllm_stateful.protocol``."""
