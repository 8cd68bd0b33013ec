"""The QEMU backend: QMP for power and snapshots, qemu-guest-agent inside the guest."""
