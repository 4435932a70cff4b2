"""The HTTP contract: request models, the error envelope and table, response encoding, HTTP plumbing."""
