"""The VMware backend: VIX through vmrun (and pyvix where it serves), VMware Tools inside the guest."""
