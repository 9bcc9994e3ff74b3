"""Consumer groups against Spate's Kafka listener, with confluent-kafka (librdkafka).

usage: consumer_groups.py STEP BOOTSTRAP [ASSIGNOR]
  split:  three members of one group split a 3-partition topic; when one leaves the other two take
          over its partition; committed offsets make a restarted consumer resume where the group
          left off.
  resume: after a server restart, a member of the same group resumes from the committed offsets.
  static: two static members (group.instance.id); one restarts and takes back its partitions
          without a rebalance: the other member's assignment is never revoked.
Exits non-zero on any mismatch.
"""

import sys
import threading
import time

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

TOPIC = "groups"
GROUP = "grp"
# range, roundrobin or cooperative-sticky: the coordinator passes assignments through either way.
ASSIGNOR = sys.argv[3] if len(sys.argv) > 3 else "range"
TIMEOUT_S = 60


def produce(bootstrap, start, n):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(start, start + n):
        p.produce(TOPIC, key=f"k{i % 17}", value=str(i))
    if p.flush(30) != 0:
        sys.exit("messages undelivered")


def consumer(bootstrap, name, group=GROUP, instance=None):
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": name,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": ASSIGNOR,
    }
    if instance:
        config["group.instance.id"] = instance
    return Consumer(config)


class Member(threading.Thread):
    """Polls, records what it got, commits synchronously after each batch."""

    def __init__(self, bootstrap, name, topic=TOPIC, group=GROUP, instance=None):
        super().__init__(daemon=True)
        self.c = consumer(bootstrap, name, group, instance)
        self.revoked = 0
        self.c.subscribe([topic], on_revoke=self.on_revoke)
        self.name = name
        self.got = []
        self.errors = []
        self.assigned = []
        self.lock = threading.Lock()
        self.running = True

    def on_revoke(self, _consumer, partitions):
        if partitions:
            self.revoked += 1

    def run(self):
        while self.running:
            msgs = self.c.consume(500, 0.2)
            # Read here, on the consumer's own thread: a call from another thread would wait for
            # the consumer's lock, which this loop hardly ever releases.
            self.assigned = sorted(tp.partition for tp in self.c.assignment())
            good = [m for m in msgs if not m.error()]
            if good:
                with self.lock:
                    self.got.extend(int(m.value()) for m in good)
                try:
                    self.c.commit(asynchronous=False)
                except KafkaException as e:
                    # A commit racing a rebalance is refused (REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION);
                    # the next one after the rebalance carries the offsets.
                    self.errors.append(str(e))

    def partitions(self):
        return self.assigned

    def stop(self):
        self.running = False
        self.join(10)
        self.c.close()


def wait_for(cond, what):
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def split(bootstrap):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)]).values():
        f.result(30)
    produce(bootstrap, 0, 3000)
    members = [Member(bootstrap, f"m{i}") for i in range(3)]
    for m in members:
        m.start()
    wait_for(lambda: sum(len(m.got) for m in members) >= 3000, "3000 messages across three members")
    wait_for(lambda: all(len(m.partitions()) == 1 for m in members), "one partition per member")
    parts = sorted(p for m in members for p in m.partitions())
    if parts != [0, 1, 2]:
        sys.exit(f"three members should split three partitions, got {parts}")
    everything = sorted(v for m in members for v in m.got)
    if everything != list(range(3000)):
        sys.exit(f"group consumed {len(everything)} messages, duplicates or gaps")
    print("split: three members each own one partition and consumed 3000 messages once")

    # One member leaves: the other two take over its partition.
    leaving = members.pop()
    leaving.stop()
    wait_for(lambda: sorted(p for m in members for p in m.partitions()) == [0, 1, 2],
             "the remaining two members to cover all partitions")
    produce(bootstrap, 3000, 600)
    wait_for(lambda: sum(1 for m in members for v in m.got if v >= 3000) >= 600, "600 more messages")
    print("split: after a member left, two members cover all three partitions")
    for m in members:
        m.stop()

    # A new member resumes from the committed offsets: only new messages arrive.
    produce(bootstrap, 3600, 300)
    m = Member(bootstrap, "late")
    m.start()
    wait_for(lambda: len(m.got) >= 300, "300 new messages for a restarted consumer")
    time.sleep(1.0)
    m.stop()
    if sorted(m.got) != list(range(3600, 3900)):
        sys.exit(f"restarted consumer should get exactly the 300 uncommitted messages, got {len(m.got)}")
    print("split: a restarted consumer resumed at the committed offsets")


def resume(bootstrap):
    produce(bootstrap, 3900, 100)
    m = Member(bootstrap, "after-restart")
    m.start()
    wait_for(lambda: len(m.got) >= 100, "100 new messages after a server restart")
    time.sleep(1.0)
    m.stop()
    if sorted(m.got) != list(range(3900, 4000)):
        sys.exit(f"after a server restart the group should resume at its committed offsets, got {len(m.got)}")
    print("resume: committed offsets survived the server restart")


def static(bootstrap):
    topic, group = "static", "static-grp"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)]).values():
        f.result(30)

    def produce_to(start, n):
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
        for i in range(start, start + n):
            p.produce(topic, key=f"k{i % 17}", value=str(i))
        if p.flush(30) != 0:
            sys.exit("messages undelivered")

    produce_to(0, 300)
    a = Member(bootstrap, "a", topic, group, instance="instance-a")
    b = Member(bootstrap, "b", topic, group, instance="instance-b")
    a.start()
    b.start()
    wait_for(lambda: len(a.got) + len(b.got) >= 300, "300 messages across two static members")
    wait_for(lambda: sorted(a.partitions() + b.partitions()) == [0, 1, 2],
             "two static members to cover three partitions")
    a_parts, b_parts = a.partitions(), b.partitions()
    b_revoked = b.revoked
    description = admin.describe_consumer_groups([group])[group].result(30)
    instances = sorted(m.group_instance_id for m in description.members)
    if instances != ["instance-a", "instance-b"]:
        sys.exit(f"DescribeGroups should list both instance ids, got {instances}")

    # Member a restarts with the same instance id, well within its session timeout: a static
    # member leaves no LeaveGroup behind, and its successor takes its place as it was.
    a.stop()
    a2 = Member(bootstrap, "a2", topic, group, instance="instance-a")
    a2.start()
    produce_to(300, 300)
    wait_for(lambda: len(a2.got) + len([v for v in b.got if v >= 300]) >= 300,
             "300 more messages after the restart")
    wait_for(lambda: a2.partitions() == a_parts, "the restarted member to hold its old partitions")
    if b.revoked != b_revoked or b.partitions() != b_parts:
        sys.exit(f"the other static member was rebalanced: {b.revoked - b_revoked} revocations, "
                 f"partitions {b_parts} -> {b.partitions()}")
    everything = sorted(a.got + a2.got + b.got)
    if everything != list(range(600)):
        sys.exit(f"the group consumed {len(everything)} messages, duplicates or gaps")
    description = admin.describe_consumer_groups([group])[group].result(30)
    if str(description.state) not in ("ConsumerGroupState.STABLE", "STABLE"):
        sys.exit(f"the group should be stable, is {description.state}")
    a2.stop()
    b.stop()
    print(f"static: a restarted static member took back partitions {a_parts} without a rebalance; "
          f"the other kept {b_parts}")


if __name__ == "__main__":
    {"split": split, "resume": resume, "static": static}[sys.argv[1]](sys.argv[2])
