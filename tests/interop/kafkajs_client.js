// kafkajs against Spate's Kafka listener: creates a 3-partition topic, produces 10,000 keyed
// messages with headers (gzip), consumes them with a consumer group of two members, and checks
// key, value, headers and per-key order.
// usage: node kafkajs_client.js BOOTSTRAP
'use strict';

const { Kafka, CompressionTypes, ConfigResourceTypes, logLevel } = require('kafkajs');

const N = 10000;
const KEYS = 23;
const TOPIC = 'interop-kafkajs';

async function main() {
  const kafka = new Kafka({ clientId: 'interop', brokers: [process.argv[2]], logLevel: logLevel.ERROR });
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic: TOPIC, numPartitions: 3, replicationFactor: 1 }] });
  // AlterConfigs replaces the topic's settings: the one named is set, the others keep defaults.
  const resource = { type: ConfigResourceTypes.TOPIC, name: TOPIC };
  await admin.alterConfigs({
    validateOnly: false,
    resources: [{ ...resource, configEntries: [{ name: 'retention.ms', value: '5400000' }] }],
  });
  const described = await admin.describeConfigs({
    includeSynonyms: false,
    resources: [{ ...resource, configNames: ['retention.ms', 'max.message.bytes'] }],
  });
  const entries = Object.fromEntries(described.resources[0].configEntries.map((e) => [e.configName, e]));
  if (entries['retention.ms'].configValue !== '5400000' || entries['retention.ms'].isDefault
      || !entries['max.message.bytes'].isDefault) {
    throw new Error(`AlterConfigs left the configs as ${JSON.stringify(entries)}`);
  }
  console.log('kafkajs: topic config changed with AlterConfigs');
  await admin.disconnect();

  const producer = kafka.producer({ idempotent: true });
  await producer.connect();
  for (let start = 0; start < N; start += 1000) {
    const messages = [];
    for (let i = start; i < start + 1000; i++) {
      messages.push({ key: `key-${i % KEYS}`, value: `value-${i}`, headers: { seq: `${i}` } });
    }
    await producer.send({ topic: TOPIC, compression: CompressionTypes.GZIP, acks: -1, messages });
  }
  await producer.disconnect();

  const received = [];
  const members = [];
  const assigned = new Set();
  for (let m = 0; m < 2; m++) {
    const consumer = kafka.consumer({ groupId: 'interop-kafkajs', sessionTimeout: 10000, heartbeatInterval: 500 });
    await consumer.connect();
    await consumer.subscribe({ topic: TOPIC, fromBeginning: true });
    consumer.on(consumer.events.GROUP_JOIN, (e) => {
      for (const p of e.payload.memberAssignment[TOPIC] || []) assigned.add(`${m}:${p}`);
    });
    await consumer.run({
      eachMessage: async ({ partition, message }) => {
        received.push([message.key.toString(), message.value.toString(), message.headers.seq.toString(), partition]);
      },
    });
    members.push(consumer);
  }
  const deadline = Date.now() + 60000;
  while (received.length < N && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
  }
  for (const c of members) await c.disconnect();

  if (received.length !== N) throw new Error(`received ${received.length} messages, expected ${N}`);
  const byKey = new Map();
  const seen = new Set();
  for (const [key, value, seq] of received) {
    const i = Number(value.split('-')[1]);
    if (seq !== `${i}` || key !== `key-${i % KEYS}`) throw new Error(`mismatch: ${key} ${value} ${seq}`);
    if (seen.has(i)) throw new Error(`duplicate ${value}`);
    seen.add(i);
    if (!byKey.has(key)) byKey.set(key, []);
    byKey.get(key).push(i);
  }
  for (const [key, seqs] of byKey) {
    for (let k = 1; k < seqs.length; k++) {
      if (seqs[k] < seqs[k - 1]) throw new Error(`order of ${key} broken`);
    }
  }
  const memberCount = new Set([...assigned].map((a) => a.split(':')[0])).size;
  console.log(`kafkajs: ${N} messages consumed by a group of two (${memberCount} got partitions), order and headers intact`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
