"""aiohttp: provider webhooks, the admin API, health checks and the dashboard."""
