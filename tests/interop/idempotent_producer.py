"""An idempotent librdkafka producer against a Spate server that is killed and restarted.

usage: idempotent_producer.py produce BOOTSTRAP N   -- produce N numbered messages in a steady stream, with
                                                       enable.idempotence; exit 0 once all are acked
       idempotent_producer.py verify BOOTSTRAP N    -- every number 0..N-1 is in the topic exactly once
"""

import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition, OFFSET_BEGINNING

TOPIC = "idem"
PAD = "x" * 200


def produce(bootstrap, n):
    p = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": 120000,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 200,
    })
    failed = []

    def on_delivery(err, msg):
        if err is not None:
            failed.append(str(err))

    for i in range(n):
        while True:
            try:
                p.produce(TOPIC, key=f"k{i % 11}", value=f"{i}:{PAD}", on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.1)
        if i % 1000 == 999:
            # A steady stream (about 100k messages/s) keeps requests in flight across the kills.
            p.poll(0.01)
    left = p.flush(120)
    if left or failed:
        sys.exit(f"{left} undelivered, {len(failed)} failed: {failed[:3]}")
    print(f"produced {n} messages, all acknowledged")


def verify(bootstrap, n):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "verify", "enable.auto.commit": False})
    c.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(3)])
    seen = {}
    deadline = time.time() + 60
    idle = 0
    while time.time() < deadline and idle < 3:
        msgs = [m for m in c.consume(1000, 1.0) if not m.error()]
        idle = 0 if msgs else idle + 1
        for m in msgs:
            v = int(m.value().split(b":")[0])
            seen[v] = seen.get(v, 0) + 1
    c.close()
    dups = [v for v, k in seen.items() if k > 1]
    missing = [v for v in range(n) if v not in seen]
    if dups or missing:
        sys.exit(f"{len(dups)} duplicated (e.g. {dups[:5]}), {len(missing)} missing (e.g. {missing[:5]})")
    print(f"all {n} messages present exactly once")


if __name__ == "__main__":
    {"produce": produce, "verify": verify}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
