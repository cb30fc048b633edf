"""One typed configuration for the Python API and the CLI, YAML loading, cross-field validation."""
