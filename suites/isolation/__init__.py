"""Isolation suite: the VM boundary holds (kernel, processes, mounts, devices, networks, vsock, limits)."""
