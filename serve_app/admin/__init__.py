"""The operator's side, off the public port: the admin HTTP API and console, admin tokens, the audit log."""
