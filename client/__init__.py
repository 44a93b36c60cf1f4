"""client: the Flower ClientApp, per-user private state and on-device adaptation."""
