"""Logs, metrics and traces, shared by the ingress and the model replicas."""
