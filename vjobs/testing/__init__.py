"""Test stand-ins for parts that cannot exist on a development machine. Not used by vjobs itself."""
