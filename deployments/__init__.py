"""The model side: the per-model Serve deployment, the vLLM engine and its simulated stand-in, and the wire types."""
