"""Building Kata Containers parts from upstream sources (guest kernel, bundle), cached by content hash."""
