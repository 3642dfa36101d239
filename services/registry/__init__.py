"""The registry: validates and stores configuration, the only writer of config state, announcing each change."""
