"""Kafka clients connecting to Spate over TLS, verifying its certificate.

usage: tls.py ssl BOOTSTRAP CA_FILE
       tls.py sasl_ssl BOOTSTRAP CA_FILE TOKEN
       tls.py mtls BOOTSTRAP CA_FILE CLIENT_CERT CLIENT_KEY OTHER_CERT OTHER_KEY
`ssl`: librdkafka (confluent-kafka) and kafka-python with security.protocol SSL create a topic,
produce and consume back; a plaintext client and one that does not trust the certificate are
refused. `sasl_ssl`: the same over SASL_SSL with an access token as the PLAIN password. `mtls`:
the same over SSL presenting a client certificate; clients without one, or with OTHER_CERT (from
another CA), are refused. Both clients check the broker's host name (127.0.0.1) against the
certificate. Exits non-zero on any mismatch.
"""

import sys
import time

from checks import refused
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

MODE, BOOTSTRAP, CA_FILE = sys.argv[1], sys.argv[2], sys.argv[3]
TOKEN = sys.argv[4] if MODE == "sasl_ssl" else None
CLIENT, OTHER = (sys.argv[4:6], sys.argv[6:8]) if MODE == "mtls" else (None, None)
PROTOCOL = "SSL" if MODE == "mtls" else MODE.upper()
TOPIC = f"over-{MODE}"


def rdkafka_config(client=CLIENT):
    config = {
        "bootstrap.servers": BOOTSTRAP,
        "security.protocol": PROTOCOL,
        "ssl.ca.location": CA_FILE,
        "ssl.endpoint.identification.algorithm": "https",
    }
    if TOKEN:
        config.update({"sasl.mechanism": "PLAIN", "sasl.username": "app", "sasl.password": TOKEN})
    if client:
        config.update({"ssl.certificate.location": client[0], "ssl.key.location": client[1]})
    return config


def librdkafka():
    admin = AdminClient(rdkafka_config())
    for f in admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)]).values():
        f.result(30)
    p = Producer({**rdkafka_config(), "acks": "all", "compression.type": "gzip"})
    for i in range(1000):
        p.produce(TOPIC, key=f"k{i % 11}", value=str(i), headers=[("n", str(i).encode())])
    if p.flush(30) != 0:
        sys.exit("librdkafka: messages undelivered")
    c = Consumer({**rdkafka_config(), "group.id": f"{TOPIC}-group", "auto.offset.reset": "earliest"})
    c.subscribe([TOPIC])
    got = {}
    deadline = time.time() + 60
    while len(got) < 1000 and time.time() < deadline:
        for m in c.consume(200, 0.5):
            if not m.error():
                n = int(m.value())
                if m.key() != f"k{n % 11}".encode() or dict(m.headers()) != {"n": str(n).encode()}:
                    sys.exit(f"librdkafka: record {n} came back changed")
                got[n] = m
    c.close()
    if sorted(got) != list(range(1000)):
        sys.exit(f"librdkafka: consumed {len(got)} of 1000")
    refused({"bootstrap.servers": BOOTSTRAP}, "a plaintext client")
    # The system's roots do not include the test's self-signed certificate.
    untrusted = {k: v for k, v in rdkafka_config().items() if k != "ssl.ca.location"}
    refused({**untrusted, "ssl.ca.location": "/etc/ssl/certs/ca-certificates.crt"},
            "a client that does not trust the certificate")
    if MODE == "mtls":
        refused(rdkafka_config(client=None), "a client without a certificate")
        refused(rdkafka_config(client=OTHER), "a client with another CA's certificate")
    print(f"librdkafka: {MODE}: 1000 records produced (gzip) and consumed with keys and headers; "
          "a plaintext client and an untrusting one were refused"
          + ("; so were clients without a certificate or with another CA's" if CLIENT else ""))


def kafka_python():
    from kafka import KafkaConsumer, KafkaProducer

    common = {
        "bootstrap_servers": BOOTSTRAP,
        "security_protocol": PROTOCOL,
        "ssl_cafile": CA_FILE,
        "ssl_check_hostname": True,
    }
    if CLIENT:
        common.update({"ssl_certfile": CLIENT[0], "ssl_keyfile": CLIENT[1]})
    if TOKEN:
        common.update({"sasl_mechanism": "PLAIN", "sasl_plain_username": "app",
                       "sasl_plain_password": TOKEN})
    p = KafkaProducer(**common, acks="all")
    for i in range(1000, 1100):
        p.send(TOPIC, key=b"kp", value=str(i).encode())
    p.flush(30)
    p.close()
    c = KafkaConsumer(TOPIC, **common, group_id=f"{TOPIC}-python", auto_offset_reset="earliest",
                      consumer_timeout_ms=10000)
    got = sorted(int(m.value) for m in c)
    c.close()
    if got != list(range(1100)):
        sys.exit(f"kafka-python: consumed {len(got)} of 1100")
    print(f"kafka-python: {MODE}: 100 records produced, all 1100 consumed")


if __name__ == "__main__":
    librdkafka()
    kafka_python()
