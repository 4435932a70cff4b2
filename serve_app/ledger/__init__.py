"""The ledger's system of record: the SQL database the Redis stream is exported to, and the exporter."""
