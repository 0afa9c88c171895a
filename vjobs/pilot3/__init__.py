"""Running PanDA Pilot 3 against vjobs, for tests: the pilot stays outside the vjobs core, which learns
nothing about PanDA."""
