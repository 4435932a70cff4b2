"""qubittron-serve: the gateway side of an OpenAI-compatible API on Ray Serve and vLLM, one subpackage per concern."""
