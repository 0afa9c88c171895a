"""The host: who owns what, its budget (admission, allocation), its cache, its locks and garbage collection."""
