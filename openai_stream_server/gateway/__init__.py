"""One server for a team: API keys with names, limits and ownership (docs/team.md)."""
