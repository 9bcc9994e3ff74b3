//! Real Kafka clients against the real binary's Kafka listener: kcat (librdkafka's CLI),
//! confluent-kafka (librdkafka from Python), kafka-python, kafkajs and Kafka's own Java tools. They
//! create 3-partition topics, produce keyed, compressed messages and consume them all back, with
//! and without consumer groups; records produced over Kafka are read over HTTP too. The client
//! programs live in `tests/interop/`; `scripts/test` installs the clients.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn run_python(client: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let stdout = common::interop(
        "python3",
        "kafka_clients.py",
        &[client, &server.kafka, &server.url],
    );
    assert!(stdout.contains("10000 messages consumed"), "{stdout}");
    assert!(stdout.contains("HTTP read all 10000"), "{stdout}");
    assert!(stdout.contains("topic config"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
}

/// The folder of Kafka's jars (`SPATE_KAFKA_JARS`, which scripts/test sets after fetching them).
fn kafka_jars() -> String {
    let jars = std::env::var("SPATE_KAFKA_JARS").unwrap_or_else(|_| "/tmp/kafka-jars/4.4.0".into());
    assert!(
        Path::new(&jars).is_dir(),
        "Kafka's jars are missing in {jars}: run scripts/test, which fetches them"
    );
    jars
}
#[test]
fn confluent_kafka_produces_and_consumes() {
    run_python("confluent");
}

#[test]
fn kafka_python_produces_and_consumes() {
    run_python("kafka-python");
}

fn kcat(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat runs (scripts/test installs it)");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(s) = input {
        stdin.write_all(s.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kcat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kcat_produces_with_every_codec_and_consumes_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let k = server.kafka.as_str();
    let created = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "topics",
            "create",
            "k",
            "--partitions",
            "3",
            "--server",
            &server.url,
        ])
        .output()
        .unwrap();
    assert!(created.status.success());
    let mut sent = Vec::new();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let lines: Vec<String> = (0..400)
            .map(|i| {
                let n = sent.len();
                sent.push((format!("key-{}", i % 13), format!("{codec}-{n}")));
                format!("key-{}:{codec}-{n}", i % 13)
            })
            .collect();
        kcat(
            &["-b", k, "-t", "k", "-P", "-K:", "-z", codec],
            Some(&(lines.join("\n") + "\n")),
        );
    }
    let out = kcat(
        &["-b", k, "-t", "k", "-C", "-e", "-q", "-f", "%p %o %k %s\n"],
        None,
    );
    let mut got: Vec<(u32, u64, String, String)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].to_string(),
                f[3].to_string(),
            )
        })
        .collect();
    assert_eq!(got.len(), sent.len());
    got.sort();
    // Per key, values come back in the order they were produced (one key, one partition).
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut partition_of: HashMap<&str, u32> = HashMap::new();
    for (p, _, key, value) in &got {
        by_key
            .entry(key)
            .or_default()
            .push(value.rsplit('-').next().unwrap().parse().unwrap());
        assert_eq!(
            *partition_of.entry(key).or_insert(*p),
            *p,
            "key {key} spans partitions"
        );
    }
    for (key, seq) in &by_key {
        assert!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {seq:?}"
        );
    }
    let mut values: Vec<String> = got.iter().map(|g| format!("{}:{}", g.2, g.3)).collect();
    let mut expected: Vec<String> = sent.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    values.sort();
    expected.sort();
    assert_eq!(values, expected);
    // Metadata lists the topic with its partitions and this node as the leader.
    let meta = kcat(&["-b", k, "-L", "-t", "k"], None);
    assert!(meta.contains("topic \"k\" with 3 partitions"), "{meta}");
    assert!(meta.contains(&format!("broker 0 at {k}")), "{meta}");
    assert_eq!(server.terminate().code(), Some(0));
}

fn groups_step(step: &str, kafka: &str, assignor: &str) {
    common::interop("python3", "consumer_groups.py", &[step, kafka, assignor]);
}

#[test]
fn consumer_groups_split_rebalance_and_resume_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    // Three members split three partitions; one leaves and two take over; a restarted consumer
    // resumes at the committed offsets.
    groups_step("split", &server.kafka, "range");
    // The group as the HTTP API shows it: everything consumed and committed, nobody left.
    let groups: serde_json::Value = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::get(format!("{}/v1/groups", server.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let g = &groups["groups"][0];
    assert_eq!(g["group"], "grp", "{groups}");
    assert_eq!(g["state"], "Empty", "{groups}");
    assert_eq!(g["members"], 0);
    assert_eq!(g["lag"], 0, "{groups}");
    let offsets = g["offsets"].as_array().unwrap();
    assert_eq!(offsets.len(), 3);
    let committed: u64 = offsets
        .iter()
        .map(|o| o["committed"].as_u64().unwrap())
        .sum();
    assert_eq!(committed, 3900);
    assert_eq!(server.terminate().code(), Some(0));
    // Committed offsets survive a server restart.
    let server = common::start(dir.path(), &[]);
    groups_step("resume", &server.kafka, "range");
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn consumer_groups_work_with_round_robin_and_cooperative_sticky_assignment() {
    for assignor in ["roundrobin", "cooperative-sticky"] {
        let dir = tempfile::tempdir().unwrap();
        let server = common::start(dir.path(), &[]);
        groups_step("split", &server.kafka, assignor);
        assert_eq!(server.terminate().code(), Some(0));
    }
}

#[test]
fn a_static_member_restarts_without_rebalancing_its_group_and_lag_is_on_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_env(dir.path(), &[], &[("SPATE_METRICS_INTERVAL_MS", "200")]);
    // librdkafka with group.instance.id: a member closes (no LeaveGroup, as static members do)
    // and comes back with the same instance id; the other member's partitions are not revoked.
    groups_step("static", &server.kafka, "range");
    // Everything was consumed and committed; 7 more records make a lag of 7 on /metrics.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = |want_lag: u64| {
        rt.block_on(async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let text = reqwest::get(format!("{}/metrics", server.url))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let lag: f64 = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("spate_consumer_group_lag_records{")
                            && l.contains("group=\"static-grp\"")
                    })
                    .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                    .sum();
                let partitions = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("spate_consumer_group_lag_records{")
                            && l.contains("group=\"static-grp\"")
                    })
                    .count();
                if lag == want_lag as f64 && partitions == 3 {
                    return text;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "lag {lag} over {partitions} partitions, want {want_lag}:\n{text}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let text = metrics(0);
    // Static members that closed stay members until their session times out (6 s here).
    let members = text
        .lines()
        .find_map(|l| l.strip_prefix("spate_consumer_group_members{group=\"static-grp\"} "))
        .unwrap_or_else(|| panic!("no members gauge in\n{text}"));
    assert!(["0", "1", "2"].contains(&members), "{members}");
    rt.block_on(async {
        for i in 0..7 {
            let r = reqwest::Client::new()
                .post(format!("{}/v1/topics/static/events", server.url))
                .header("content-type", "application/cloudevents+json")
                .body(format!(
                    r#"{{"specversion":"1.0","id":"m{i}","source":"/t","type":"t","partitionkey":"k{i}"}}"#
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    });
    metrics(7);
    assert_eq!(server.terminate().code(), Some(0));
}

/// A free loopback port (bound and released), so a restarted server can listen where clients
/// expect it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn idempotent_producer_has_no_duplicates_across_kill_9_restarts() {
    const N: &str = "400000";
    let dir = tempfile::tempdir().unwrap();
    let kafka = format!("127.0.0.1:{}", free_port());
    let args = ["--kafka-addr", kafka.as_str()];
    let server = common::start(dir.path(), &args);
    let created = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "topics",
            "create",
            "idem",
            "--partitions",
            "3",
            "--server",
            &server.url,
        ])
        .output()
        .unwrap();
    assert!(created.status.success());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/idempotent_producer.py");
    let producer = Command::new("python3")
        .arg(&script)
        .args(["produce", &kafka, N])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs the clients)");
    // Kill the server five times while the producer runs at full speed, so batches are written but
    // not yet acknowledged at each kill; the producer retries them against the restarted server.
    let mut server = server;
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        server.kill9();
        server = common::start(dir.path(), &args);
    }
    let out = producer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "producer failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = common::interop("python3", "idempotent_producer.py", &["verify", &kafka, N]);
    assert!(
        stdout.contains(&format!("all {N} messages present exactly once")),
        "{stdout}"
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn kafkajs_produces_and_consumes_with_a_group_of_two() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let stdout = common::interop("node", "kafkajs_client.js", &[&server.kafka]);
    assert!(
        stdout.contains("10000 messages consumed by a group of two (2 got partitions)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("topic config changed with AlterConfigs"),
        "{stdout}"
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn kafkas_own_java_tools_work_unchanged() {
    // scripts/test fetches the jars with ../shared/tools/kafka/kafka.sh and exports their folder.
    let jars = kafka_jars();
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let stdout = common::interop("bash", "java_tools.sh", &[&server.kafka, &jars]);
    assert!(
        stdout.contains("config command: topic settings"),
        "{stdout}"
    );
    assert!(stdout.contains("java tools: all checks passed"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn kafka_clients_authenticate_with_sasl_plain_and_an_access_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "kafka-clients-token-0123456789\nkafka-reader-token-0123456789 read-only\n",
    )
    .unwrap();
    let server = common::start(
        &dir.path().join("data"),
        &["--auth-tokens-file", tokens.to_str().unwrap()],
    );
    // librdkafka and kafka-python: produce and consume with the token as the SASL/PLAIN
    // password; a wrong password and no SASL are refused; the read-only token consumes only.
    let stdout = common::interop(
        "python3",
        "sasl.py",
        &[
            &server.kafka,
            "kafka-clients-token-0123456789",
            "kafka-reader-token-0123456789",
        ],
    );
    assert!(
        stdout.contains("read-only token: 250 records consumed"),
        "{stdout}"
    );
    // Kafka's own Java tools, with a JAAS configuration.
    let jars = kafka_jars();
    let stdout = common::interop(
        "bash",
        "java_sasl.sh",
        &[&server.kafka, &jars, "kafka-clients-token-0123456789"],
    );
    assert!(stdout.contains("a wrong password refused"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn kafka_clients_connect_over_tls_sasl_ssl_and_mutual_tls_verifying_certificates() {
    let dir = tempfile::tempdir().unwrap();
    common::self_signed(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let data = dir.path().join("data");
    let tls = ["--tls-cert", cert, "--tls-key", key];
    let server = common::start(&data, &tls);
    // librdkafka and kafka-python with security.protocol SSL.
    common::interop("python3", "tls.py", &["ssl", &server.kafka, cert]);
    // kcat (librdkafka's command line) lists the topic over TLS.
    let out = Command::new("kcat")
        .args(["-b", &server.kafka, "-X", "security.protocol=ssl", "-X"])
        .arg(format!("ssl.ca.location={cert}"))
        .args(["-L", "-t", "over-ssl", "-m", "10"])
        .output()
        .expect("kcat runs (scripts/test installs it)");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(
        listing.contains("topic \"over-ssl\" with 3 partitions"),
        "{listing}"
    );
    // Kafka's own Java tools, with a PEM trust store.
    let jars = kafka_jars();
    let stdout = common::interop("bash", "java_tls.sh", &[&server.kafka, &jars, cert]);
    assert!(stdout.contains("100 records round-tripped"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
    // The same data over SASL_SSL: TLS and an access token.
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "tls-clients-token-0123456789\n").unwrap();
    let mut args = tls.to_vec();
    args.extend(["--auth-tokens-file", tokens.to_str().unwrap()]);
    let server = common::start(&data, &args);
    common::interop(
        "python3",
        "tls.py",
        &[
            "sasl_ssl",
            &server.kafka,
            cert,
            "tls-clients-token-0123456789",
        ],
    );
    assert_eq!(server.terminate().code(), Some(0));
    // Mutual TLS: clients present certificates from the given CA.
    common::client_certificates(dir.path());
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let ca = file("client-ca.pem");
    let mut args = tls.to_vec();
    args.extend(["--tls-client-ca", &ca]);
    let server = common::start(&data, &args);
    let (client, client_key) = (file("client.pem"), file("client-key.pem"));
    let (other, other_key) = (file("stranger.pem"), file("stranger-key.pem"));
    common::interop(
        "python3",
        "tls.py",
        &[
            "mtls",
            &server.kafka,
            cert,
            &client,
            &client_key,
            &other,
            &other_key,
        ],
    );
    let stdout = common::interop(
        "bash",
        "java_tls.sh",
        &[&server.kafka, &jars, cert, &client, &client_key],
    );
    assert!(stdout.contains("(java-mtls)"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
}
