"""Operations: the `qbt` CLI, the local launcher, and the builders of the dev models."""
