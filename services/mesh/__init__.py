"""The shared kernel: resource kinds, validation, storage, bus, naming and process helpers."""
