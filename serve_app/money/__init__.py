"""Money: API keys, accounts, admission and rate limits, settlement and the ledger (integer micro-dollars)."""
