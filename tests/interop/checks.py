"""Checks shared by the interoperability programs."""

import sys

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient


def refused(config, what):
    """Exits with a message unless a librdkafka client set up with `config` is refused metadata."""
    # Quiet: the client logs every failed attempt.
    admin = AdminClient({**config, "error_cb": lambda e: None, "log_level": 0})
    try:
        admin.list_topics(timeout=5)
    except KafkaException:
        return
    sys.exit(f"{what}: metadata was served")
