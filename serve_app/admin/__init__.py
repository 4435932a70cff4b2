"""The operator's side: the admin HTTP API and its console (`app.py`), admin tokens (`tokens.py`) and the audit log
(`audit.py`). It runs as its own process (`qbt admin serve`), never on the public port."""
