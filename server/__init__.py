"""server: the Flower ServerApp. It holds only the shared basis A."""
