"""vjobs' own drivers. Each is a plugin registered in pyproject.toml's ``vjobs.drivers`` entry points; the
core reaches them only through vjobs.drivers.registry."""
