"""Kafka clients authenticating to Spate with SASL/PLAIN, an access token as the password.

usage: sasl.py BOOTSTRAP TOKEN
librdkafka (confluent-kafka) and kafka-python each create or use a topic, produce and consume
back; a wrong password and no SASL at all are refused. Exits non-zero on any mismatch.
"""

import sys
import time

from checks import refused
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP, TOKEN = sys.argv[1], sys.argv[2]
TOPIC = "secured"


def sasl(password):
    return {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "app",
        "sasl.password": password,
    }


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
    got = []
    deadline = time.time() + 60
    while len(got) < 200 and time.time() < deadline:
        for m in c.consume(100, 0.5):
            if not m.error():
                got.append(int(m.value()))
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


if __name__ == "__main__":
    librdkafka()
    kafka_python()
