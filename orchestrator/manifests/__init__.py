"""User manifests: strict schema, line-aware loading, cross-document checks."""
