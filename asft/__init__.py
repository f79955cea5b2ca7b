"""The `asft` command: the service (serve, api, worker, migrate, teams) and the client."""
