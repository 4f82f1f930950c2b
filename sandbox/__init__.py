"""Stand-ins for the outside world that Parley talks to, for tests, benchmarks and demos.

sandbox.simulator: the WhatsApp Cloud API and Twilio's Messages API (sends, limits, failures,
signed status webhooks back to Parley).
"""
