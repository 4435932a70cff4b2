"""Configuration: the typed service and model specs, the catalog and its profiles, sizing, the KubeRay manifest."""
