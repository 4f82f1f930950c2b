"""Per provider: verify and parse inbound requests (and, later, build send requests). Pure, so
that both the API (ingress) and the agents (senders, outgoing webhooks) can use it."""
