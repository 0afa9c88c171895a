"""Guest images: the catalogue, the content store, the built-in boot image and root file systems."""
