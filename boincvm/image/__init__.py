"""Base images: the bundled example guest, image descriptors and guest-tools inspection."""
