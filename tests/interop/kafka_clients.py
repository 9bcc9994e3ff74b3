"""Drives Spate's Kafka listener with real Kafka clients we did not write.

usage: kafka_clients.py CLIENT BOOTSTRAP HTTP_URL
CLIENT is confluent (librdkafka) or kafka-python. Creates a topic with 3 partitions through the
client's admin API, produces 10,000 keyed messages with headers (compressed), consumes them all
back by partition assignment, and checks key, value, headers and per-key order. Then reads the
compressed records through Spate's HTTP API. Exits non-zero on any mismatch.
"""

import base64
import json
import sys
import time
import urllib.request

N = 10_000
KEYS = 37
TIMEOUT_S = 120


def expected():
    return [(f"key-{i % KEYS}", f"value-{i}", str(i)) for i in range(N)]


def check(received, client):
    sent = expected()
    if len(received) != N:
        sys.exit(f"{client}: received {len(received)} messages, expected {N}")
    by_key = {}
    for key, value, header in received:
        by_key.setdefault(key, []).append(int(value.split("-")[1]))
        if header != value.split("-")[1]:
            sys.exit(f"{client}: header {header!r} does not match value {value!r}")
    if sorted(received) != sorted(sent):
        sys.exit(f"{client}: received messages differ from those sent")
    for key, seq in by_key.items():
        if seq != sorted(seq):
            sys.exit(f"{client}: order of key {key} broken")
    print(f"{client}: {N} messages consumed with keys, values, headers and per-key order intact")


def check_http(http, topic, client):
    """The HTTP read path decompresses what Kafka clients produced."""
    seen = 0
    for p in range(3):
        offset = 0
        while True:
            url = f"{http}/v1/topics/{topic}/events?partition={p}&offset={offset}&limit=1000"
            page = json.load(urllib.request.urlopen(url))
            for e in page["events"]:
                ev = e["event"]
                value = base64.b64decode(ev["data_base64"]).decode()
                if not value.startswith("value-") or ev["type"] != "spate.record":
                    sys.exit(f"{client}: unexpected event over HTTP: {ev}")
                seen += 1
            if not page["events"]:
                break
            offset = page["next_offset"]
    if seen != N:
        sys.exit(f"{client}: HTTP read {seen} events, expected {N}")
    print(f"{client}: HTTP read all {N} compressed records back as events")


def confluent(bootstrap, topic):
    from confluent_kafka import Consumer, Producer, TopicPartition, OFFSET_BEGINNING
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(topic, num_partitions=3, replication_factor=1, config={"retention.ms": "3600000"})
    for f in admin.create_topics([new]).values():
        f.result(30)
    resource = ConfigResource(ResourceType.TOPIC, topic)
    configs = admin.describe_configs([resource])[resource].result(30)
    if configs["retention.ms"].value != "3600000":
        sys.exit(f"confluent: DescribeConfigs says retention.ms={configs['retention.ms'].value}")
    # IncrementalAlterConfigs changes one setting; a bad value is refused and changes nothing.
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry

    def incremental(name, value):
        entry = ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
        change = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
        admin.incremental_alter_configs([change])[change].result(30)

    def described():
        return {k: v.value for k, v in admin.describe_configs([resource])[resource].result(30).items()}

    before = described()
    incremental("retention.ms", "7200000")
    after = described()
    if after != {**before, "retention.ms": "7200000"}:
        sys.exit(f"confluent: after IncrementalAlterConfigs the configs are {after}, not {before} with retention.ms=7200000")
    try:
        incremental("retention.ms", "soon")
        sys.exit("confluent: retention.ms=soon was accepted")
    except KafkaException as e:
        if e.args[0].code() != KafkaError.INVALID_CONFIG:
            sys.exit(f"confluent: retention.ms=soon got {e}, not INVALID_CONFIG")
    if described() != after:
        sys.exit("confluent: a refused config change changed the configs")
    print("confluent: topic config changed with IncrementalAlterConfigs; a bad value got INVALID_CONFIG")
    failures = []

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(err)

    # Half the messages snappy-compressed, half zstd-compressed.
    messages = expected()
    for codec, part in (("snappy", messages[: N // 2]), ("zstd", messages[N // 2 :])):
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "compression.type": codec,
                             "linger.ms": 5, "partitioner": "murmur2_random"})
        for key, value, header in part:
            producer.produce(topic, key=key, value=value, headers=[("seq", header)], on_delivery=on_delivery)
            producer.poll(0)
        if producer.flush(60) != 0:
            sys.exit("confluent: messages still undelivered after 60 s")
    if failures:
        sys.exit(f"confluent: {len(failures)} deliveries failed, first: {failures[0]}")

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "interop-assign",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
    received = []
    deadline = time.time() + TIMEOUT_S
    while len(received) < N and time.time() < deadline:
        for msg in consumer.consume(1000, 1.0):
            if msg.error():
                continue
            headers = dict(msg.headers() or [])
            received.append((msg.key().decode(), msg.value().decode(), headers.get("seq", b"").decode()))
    consumer.close()
    return received


def kafka_python(bootstrap, topic):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    # Both alter APIs: IncrementalAlterConfigs (the default), then the older AlterConfigs, which
    # replaces the whole set of topic settings (the client resends the settings made before).
    resource = ConfigResource(ConfigResourceType.TOPIC, topic)
    for incremental, name, value in ((True, "retention.ms", "1800000"), (False, "retention.bytes", "1073741824")):
        change = ConfigResource(ConfigResourceType.TOPIC, topic, configs={name: value})
        result = admin.alter_configs([change], incremental=incremental)
        if result != {"topic": {topic: "OK"}}:
            sys.exit(f"kafka-python: alter_configs(incremental={incremental}) answered {result}")
    configs = admin.describe_configs([resource])["topic"][topic]
    got = {k: (v["value"], v["config_source"]) for k, v in configs.items()}
    want = {"retention.ms": ("1800000", "DYNAMIC_TOPIC_CONFIG"),
            "retention.bytes": ("1073741824", "DYNAMIC_TOPIC_CONFIG")}
    if got != want:
        sys.exit(f"kafka-python: the topic's own configs are {got}, not {want}")
    print("kafka-python: topic configs changed with IncrementalAlterConfigs and AlterConfigs")
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type="gzip", linger_ms=5)
    futures = [producer.send(topic, key=k.encode(), value=v.encode(), headers=[("seq", h.encode())])
               for k, v, h in expected()]
    producer.flush(60)
    for f in futures:
        f.get(timeout=60)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    parts = [TopicPartition(topic, p) for p in range(3)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    received = []
    deadline = time.time() + TIMEOUT_S
    while len(received) < N and time.time() < deadline:
        for records in consumer.poll(timeout_ms=1000, max_records=1000).values():
            for r in records:
                headers = dict(r.headers or [])
                received.append((r.key.decode(), r.value.decode(), headers.get("seq", b"").decode()))
    consumer.close()
    return received


def main():
    client, bootstrap, http = sys.argv[1], sys.argv[2], sys.argv[3]
    topic = f"interop-{client}"
    received = {"confluent": confluent, "kafka-python": kafka_python}[client](bootstrap, topic)
    check(received, client)
    check_http(http, topic, client)


if __name__ == "__main__":
    main()
