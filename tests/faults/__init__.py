"""Fault injection against real consumer processes, real RabbitMQ and Redis (issue 5)."""
