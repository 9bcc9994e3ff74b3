"""Kafka clients authenticating to Spate with SASL/PLAIN, an access token as the password.

usage: sasl.py BOOTSTRAP TOKEN READ_ONLY_TOKEN
librdkafka (confluent-kafka) and kafka-python each create or use a topic, produce and consume
back; a wrong password and no SASL at all are refused. With the read-only token, librdkafka
consumes in a group but may not produce or create a topic. Exits non-zero on any mismatch.
"""

import sys
import time

from checks import refused
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP, TOKEN, READER = sys.argv[1], sys.argv[2], sys.argv[3]
TOPIC = "secured"


def sasl(password):
    return {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "app",
        "sasl.password": password,
    }


def consumed(c, n):
    """The values, as numbers, of what the subscribed consumer `c` receives until it has `n` or
    60 s have passed."""
    got = []
    deadline = time.time() + 60
    while len(got) < n and time.time() < deadline:
        for m in c.consume(100, 0.5):
            if not m.error():
                got.append(int(m.value()))
    return got


def librdkafka():
    admin = AdminClient(sasl(TOKEN))
    for f in admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)]).values():
        f.result(30)
    p = Producer({**sasl(TOKEN), "acks": "all"})
    for i in range(200):
        p.produce(TOPIC, key=f"k{i % 7}", value=str(i))
    if p.flush(30) != 0:
        sys.exit("librdkafka: messages undelivered")
    c = Consumer({**sasl(TOKEN), "group.id": "secured-group", "auto.offset.reset": "earliest"})
    c.subscribe([TOPIC])
    got = consumed(c, 200)
    c.close()
    if sorted(got) != list(range(200)):
        sys.exit(f"librdkafka: consumed {len(got)} of 200")
    refused(sasl("not-the-token-0123456789"), "a wrong password")
    refused({"bootstrap.servers": BOOTSTRAP}, "no SASL")
    print("librdkafka: authenticated with SASL/PLAIN; 200 messages produced and consumed; "
          "a wrong password and no SASL were refused")


def kafka_python():
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.errors import KafkaError

    common = {
        "bootstrap_servers": BOOTSTRAP,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "app",
    }
    p = KafkaProducer(**common, sasl_plain_password=TOKEN, acks="all")
    for i in range(200, 250):
        p.send(TOPIC, key=b"kp", value=str(i).encode())
    p.flush(30)
    p.close()
    c = KafkaConsumer(TOPIC, **common, sasl_plain_password=TOKEN, group_id="secured-python",
                      auto_offset_reset="earliest", consumer_timeout_ms=10000)
    got = sorted(int(m.value) for m in c)
    c.close()
    if got != list(range(250)):
        sys.exit(f"kafka-python: consumed {len(got)} of 250")
    try:
        # kafka-python retries a failed authentication until its bootstrap times out.
        KafkaProducer(**common, sasl_plain_password="not-the-token-0123456789",
                      bootstrap_timeout_ms=5000).close()
    except KafkaError:
        pass
    else:
        sys.exit("kafka-python: a wrong password was accepted")
    print("kafka-python: authenticated with SASL/PLAIN; 250 messages consumed; a wrong password was refused")


def read_only():
    c = Consumer({**sasl(READER), "group.id": "secured-reader", "auto.offset.reset": "earliest"})
    c.subscribe([TOPIC])
    got = consumed(c, 250)
    c.commit(asynchronous=False)
    c.close()
    if sorted(got) != list(range(250)):
        sys.exit(f"read-only: consumed {len(got)} of 250")
    errors = []
    p = Producer({**sasl(READER), "acks": "all", "message.send.max.retries": 0})
    p.produce(TOPIC, value=b"not allowed", on_delivery=lambda err, _: errors.append(err))
    p.flush(30)
    if len(errors) != 1 or errors[0] is None or errors[0].code() != KafkaError.TOPIC_AUTHORIZATION_FAILED:
        sys.exit(f"read-only: a produce was not refused with TOPIC_AUTHORIZATION_FAILED: {errors}")
    admin = AdminClient(sasl(READER))
    f = admin.create_topics([NewTopic("reader-made", num_partitions=1, replication_factor=1)])
    try:
        f["reader-made"].result(30)
        sys.exit("read-only: a topic was created")
    except Exception as e:  # noqa: BLE001 - the error kind is checked below
        if "TOPIC_AUTHORIZATION_FAILED" not in str(e):
            sys.exit(f"read-only: create_topics failed otherwise: {e}")
    print("read-only token: 250 records consumed in a group and committed; a produce and a topic "
          "creation refused with TOPIC_AUTHORIZATION_FAILED")


if __name__ == "__main__":
    librdkafka()
    kafka_python()
    read_only()
