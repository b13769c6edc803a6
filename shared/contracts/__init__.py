"""The event contract, the migration spec and the migration state: what crosses the bus."""
