"""The request path and the Serve deployments that carry it: routing, tokenizing, the undecorated gateway."""
