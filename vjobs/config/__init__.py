"""The documents vjobs reads: jobs, site configs, and the JSON Schemas they are checked against."""
