//! The real binary: start-up, graceful shutdown, the data directory lock, recovery refusals, and
//! the CLI client against a running server.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

fn cli(url: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(args)
        .args(["--server", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a CLI command expecting success; its standard output.
fn cli_ok(url: &str, args: &[&str]) -> String {
    let (ok, out, err) = cli(url, args, None);
    assert!(ok, "{args:?}: {err}");
    out
}

/// `/metrics` once the per-second export of subscription and projection metrics has run.
async fn metrics_after_export(url: &str) -> String {
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Runs `spate serve` on a data directory expecting it to exit (a refused start).
fn serve_to_exit(data_dir: &std::path::Path, extra: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--kafka-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn sigterm_stops_gracefully_and_data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    assert!(
        cli(
            &url,
            &["topics", "create", "orders", "--partitions", "2"],
            None
        )
        .0
    );
    let (ok, out, _) = cli(
        &url,
        &[
            "publish",
            "orders",
            "--type",
            "order.created",
            "--key",
            "o-1",
            r#"{"amount": 5}"#,
        ],
        None,
    );
    assert!(ok);
    assert!(out.starts_with("partition "), "{out}");
    let (ok, out, _) = cli(
        &url,
        &[
            "topics",
            "alter",
            "orders",
            "--retention-ms",
            "none",
            "--segment-bytes",
            "2097152",
        ],
        None,
    );
    assert!(ok, "{out}");
    let config: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(config["retention_ms"], Value::Null);
    assert_eq!(config["segment_bytes"], 2097152);
    let (ok, _, err) = cli(
        &url,
        &["topics", "alter", "orders", "--partitions", "3"],
        None,
    );
    assert!(!ok && err.contains("--partitions"), "{err}");
    let (ok, _, err) = cli(
        &url,
        &["topics", "alter", "orders", "--segment-bytes", "5"],
        None,
    );
    assert!(!ok && err.contains("segment_bytes"), "{err}");
    assert_eq!(server.terminate().code(), Some(0));

    let server = common::start(dir.path(), &[]);
    let (ok, out, _) = cli(&server.url, &["tail", "orders"], None);
    assert!(ok);
    let e: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(e["event"]["data"]["amount"], 5);
    assert_eq!(e["event"]["partitionkey"], "o-1");
    // The settings changed before the restart hold after it.
    let (ok, out, _) = cli(&server.url, &["topics", "describe", "orders"], None);
    assert!(ok);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["config"]["retention_ms"], Value::Null);
    assert_eq!(t["config"]["segment_bytes"], 2097152);
    // The one event published is deleted; the partitions start after it.
    let (ok, out, err) = cli(
        &server.url,
        &["topics", "truncate", "orders", "--before", "0:end,1:end"],
        None,
    );
    assert!(ok, "{err}");
    let starts: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        starts["0"].as_u64().unwrap() + starts["1"].as_u64().unwrap(),
        1,
        "{out}"
    );
    let (ok, _, err) = cli(
        &server.url,
        &["topics", "truncate", "orders", "--before", "0"],
        None,
    );
    assert!(!ok && err.contains("partition:offset"), "{err}");
    assert_eq!(server.terminate().code(), Some(0));
}

#[cfg(target_os = "linux")]
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    // Kernels before 5.0 do not report the flag; the prctl itself goes back to 3.15.
    if let Some(thp) = thp {
        assert_eq!(thp, "0", "{status}");
    }
    server.kill9();
}

#[test]
fn a_sigterm_right_after_start_is_a_graceful_stop() {
    // The addresses are printed before the listeners serve: a supervisor that stops the server
    // as soon as it reads them must get a clean exit, every time.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let server = common::start(dir.path(), &[]);
        assert_eq!(server.terminate().code(), Some(0));
    }
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _server = common::start(dir.path(), &[]);
    let out = serve_to_exit(dir.path(), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another spate process"));
}

#[test]
fn corruption_refuses_start_until_repair() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    assert!(cli(&server.url, &["topics", "create", "t"], None).0);
    let lines: String = (0..20).map(|i| format!("{{\"n\": {i}}}\n")).collect();
    // Three separate publishes make three batches.
    for chunk in lines.lines().collect::<Vec<_>>().chunks(7) {
        assert!(
            cli(
                &server.url,
                &["publish", "t", "--type", "n"],
                Some(&chunk.join("\n"))
            )
            .0
        );
    }
    assert_eq!(server.terminate().code(), Some(0));
    let segment = dir.path().join("topics/t/0/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[100] ^= 0x08; // inside the first batch; two valid batches follow it
    std::fs::write(&segment, &bytes).unwrap();

    let out = serve_to_exit(dir.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt data") && err.contains("--repair"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "a refused start must not change the data"
    );

    let server = common::start(dir.path(), &["--repair"]);
    let (ok, out, _) = cli(&server.url, &["tail", "t"], None);
    assert!(ok);
    assert_eq!(
        out.lines().count(),
        0,
        "the damaged first batch and everything after it are cut"
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn cli_manages_topics_and_publishes_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &["--fsync", "interval:20"]);
    let url = server.url.clone();
    let (ok, out, _) = cli(
        &url,
        &[
            "topics",
            "create",
            "a",
            "--partitions",
            "3",
            "--retention-ms",
            "60000",
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, _, err) = cli(&url, &["topics", "create", "a"], None);
    assert!(!ok);
    assert!(err.contains("409"), "{err}");
    let input: String = (0..1200).map(|i| format!("{{\"i\": {i}}}\n")).collect();
    let (ok, _, err) = cli(&url, &["publish", "a", "--type", "n"], Some(&input));
    assert!(ok, "{err}");
    assert!(err.contains("published 1200 events"), "{err}");
    let (ok, out, _) = cli(&url, &["topics", "list"], None);
    assert!(ok);
    assert!(
        out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["a", "3", "1200", l.split_whitespace().last().unwrap()]),
        "{out}"
    );
    let (ok, out, _) = cli(&url, &["topics", "describe", "a"], None);
    assert!(ok);
    let d: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["config"]["retention_ms"], 60000);
    let (ok, out, _) = cli(
        &url,
        &["tail", "a", "--partition", "1", "--from", "0"],
        None,
    );
    assert!(ok);
    for line in out.lines() {
        assert_eq!(serde_json::from_str::<Value>(line).unwrap()["partition"], 1);
    }
    let (ok, out, _) = cli(&url, &["tail", "a", "--from", "latest"], None);
    assert!(ok);
    assert!(out.is_empty());
    let (ok, _, err) = cli(&url, &["publish", "a", "--type", "n"], Some("not json\n"));
    assert!(!ok);
    assert!(err.contains("line 1 is not JSON"), "{err}");
    assert!(cli(&url, &["topics", "delete", "a"], None).0);
    let (ok, _, err) = cli(&url, &["tail", "a"], None);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn bench_log_reports_every_configuration_against_the_disk_ceiling() {
    // A smoke run with tiny durations: checks the benchmark works and reports what it should, not
    // how fast anything is (speed is read from full runs, see docs/benchmarks.md).
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "bench",
            "log",
            "--seconds",
            "0.05",
            "--runs",
            "1",
            "--sizes",
            "100,1024",
            "--writers",
            "1,2",
        ])
        .args([
            "--fsync",
            "batch,never",
            "--append-bytes",
            "1,4096",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("disk ceiling"), "{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| batch") || l.starts_with("| never"))
        .collect();
    assert_eq!(rows.len(), 2 * 2 * 2 * 2, "{text}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let records_per_s: f64 = cells[5].parse().unwrap();
        assert!(records_per_s > 0.0, "{row}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the benchmark cleans up after itself"
    );
}

#[test]
fn kafka_requests_declaring_huge_arrays_do_not_take_the_server_down() {
    use std::io::Read;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    // Metadata v4 declaring 1.5 billion topics in 14 bytes, and Metadata v12 (flexible) declaring
    // two billion with a varint: the codec reserves before it decodes.
    let bodies: [&[u8]; 2] = [
        &[0, 3, 0, 4, 0, 0, 0, 1, 0, 0, 0x5b, 0, 0xee, 0xec],
        &[
            0, 3, 0, 12, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07,
        ],
    ];
    for body in bodies {
        let mut s = TcpStream::connect(&server.kafka).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut req = (body.len() as i32).to_be_bytes().to_vec();
        req.extend_from_slice(body);
        s.write_all(&req).unwrap();
        let mut buf = [0u8; 64];
        // The server closes the connection on an undecodable request.
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
    // Still serving.
    let (ok, _, _) = cli(&server.url, &["topics", "list"], None);
    assert!(ok);
    assert_eq!(server.terminate().code(), Some(0));
}

/// `promtool`, from PATH or from where `scripts/test` unpacks Debian's `prometheus` package.
fn promtool() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("SPATE_PROMTOOL") {
        return p.into();
    }
    "promtool".into()
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    let http = reqwest::Client::new();
    common::create_topic(&http, &url, "m", 2).await;
    // An SSE subscriber with a filter that fails on events lacking `data.n`.
    let mut sse = http
        .get(format!("{url}/v1/topics/m/sse?filter=data.n%20%3E%200"))
        .send()
        .await
        .unwrap();
    let events: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            serde_json::json!({"specversion": "1.0", "id": format!("m{i}"), "source": "/t",
                "type": "t", "data": if i < 3 { serde_json::json!({"n": i + 1}) } else { serde_json::json!({}) }})
        })
        .collect();
    common::publish_batch(&http, &url, "m", &events).await;
    // Three events match; read until all three arrived.
    let mut text = String::new();
    while text.matches("\"offset\"").count() < 3 {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), sse.chunk())
            .await
            .expect("SSE data within 10 s")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let body = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("spate_records_appended_total{topic=\"m\"}"), 5.0);
    assert_eq!(value("spate_deliveries_total{protocol=\"sse\"}"), 3.0);
    assert_eq!(value("spate_filter_errors_total"), 2.0);
    assert_eq!(value("spate_connections{protocol=\"sse\"}"), 1.0);
    let ends = value("spate_log_end_offset{topic=\"m\",partition=\"0\"}")
        + value("spate_log_end_offset{topic=\"m\",partition=\"1\"}");
    assert_eq!(ends, 5.0);
    assert!(value("spate_fsync_seconds_count") >= 1.0);
    assert!(value("spate_publish_to_durable_seconds_count{protocol=\"http\"}") >= 1.0);
    assert!(body.contains("spate_durable_to_delivered_seconds_bucket"));
    // Delivery latency is sampled (the first delivery of a subscription always); deliveries are
    // all counted.
    let sampled = value("spate_durable_to_delivered_seconds_count{protocol=\"sse\"}");
    assert!(
        (1.0..=3.0).contains(&sampled),
        "{sampled} samples of 3 deliveries"
    );
    // Debian's promtool accepts it.
    let mut check = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test installs it; or set SPATE_PROMTOOL)");
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sse);
    server.terminate();
}

#[test]
fn cli_appends_to_and_reads_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    let (ok, out, _) = cli(
        &url,
        &["topics", "create", "orders", "--partitions", "2"],
        None,
    );
    assert!(ok, "{out}");
    let append = |expected: &str, stdin: &str| {
        cli(
            &url,
            &[
                "stream",
                "append",
                "orders",
                "order-7",
                "--type",
                "order.changed",
                "--expected-version",
                expected,
            ],
            Some(stdin),
        )
    };
    let (ok, out, err) = append("no_stream", "{\"n\": 1}\n{\"n\": 2}\n");
    assert!(ok, "{err}");
    let placed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(placed["first_version"], 0);
    assert_eq!(placed["last_version"], 1);
    let (ok, _, err) = append("0", "{\"n\": 3}\n");
    assert!(!ok);
    assert!(err.contains("409"), "{err}");
    let (ok, _, err) = append("1", "{\"n\": 3}\n");
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&url, &["stream", "read", "orders", "order-7"], None);
    assert!(ok);
    let ns: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]["data"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, [1, 2, 3]);
    let (ok, out, _) = cli(
        &url,
        &["stream", "read", "orders", "order-7", "--backward"],
        None,
    );
    assert!(ok);
    assert_eq!(out.lines().count(), 3);
    assert!(out.lines().next().unwrap().contains("\"version\":2"));
    let (ok, _, err) = cli(&url, &["stream", "read", "orders", "nope"], None);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    // Deleting: a wrong expected version is refused; then the stream reads as gone, and the
    // next append continues the versions.
    let delete = |expected: &str| {
        cli(
            &url,
            &[
                "stream",
                "delete",
                "orders",
                "order-7",
                "--expected-version",
                expected,
            ],
            None,
        )
    };
    let (ok, _, err) = delete("1");
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, out, err) = delete("2");
    assert!(ok, "{err}");
    assert!(out.contains("up to version 2"), "{out}");
    let (ok, _, err) = cli(&url, &["stream", "read", "orders", "order-7"], None);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, out, err) = append("no_stream", "{\"n\": 4}\n");
    assert!(ok, "{err}");
    let placed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(placed["first_version"], 3);
    let (ok, out, err) = cli(&url, &["stream", "list", "orders"], None);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&listed["stream"], &listed["version"]),
        (&serde_json::json!("order-7"), &serde_json::json!(3))
    );
}

#[tokio::test]
async fn cli_manages_subscriptions_and_metrics_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    let run = |args: &[&str]| cli_ok(&url, args);
    run(&["topics", "create", "jobs", "--partitions", "2"]);
    let out = run(&[
        "sub",
        "create",
        "cli",
        "--topic",
        "jobs",
        "--from",
        "earliest",
        "--max-attempts",
        "1",
        "--ack-timeout-ms",
        "200",
    ]);
    assert!(out.contains("dead letters to jobs.dlq"), "{out}");
    for i in 0..3 {
        run(&[
            "publish",
            "jobs",
            "--type",
            "job.created",
            &format!("{{\"i\": {i}}}"),
        ]);
    }
    // Pulled and never acked: after 200 ms each is out of its one attempt.
    let out = run(&["sub", "pull", "cli", "--max", "10", "--wait-ms", "2000"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let d: Value = serde_json::from_str(&run(&["sub", "describe", "cli"])).unwrap();
        if d["stats"]["dead_lettered"] == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{d}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(run(&["sub", "redrive", "cli"]).contains("redrove 3"));
    let (ok, out, err) = cli(
        &url,
        &[
            "sub",
            "pull",
            "cli",
            "--max",
            "10",
            "--wait-ms",
            "2000",
            "--ack",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3);
    assert!(err.contains("acked 3"), "{err}");
    let list = run(&["sub", "list"]);
    assert!(list.lines().nth(1).unwrap().starts_with("cli "), "{list}");
    let (ok, _, err) = cli(&url, &["sub", "describe", "nope"], None);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");

    // Metrics are exported every second.
    let body = metrics_after_export(&url).await;
    for line in [
        "spate_subscription_dead_letters_total{subscription=\"cli\"} 3",
        "spate_subscription_redeliveries_total{subscription=\"cli\"} 0",
        "spate_subscription_backlog{subscription=\"cli\"} 0",
        "spate_subscription_oldest_unacked_seconds{subscription=\"cli\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line} in\n{body}");
    }
    run(&["sub", "delete", "cli"]);

    // A webhook subscription with a header and a signing secret: the definition keeps the
    // header and hides the secret; a header without a value is refused before any request.
    let secret = "whsec_MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIz";
    run(&[
        "sub",
        "create",
        "hooked",
        "--topic",
        "jobs",
        "--push-url",
        "http://127.0.0.1:9/hook",
        "--push-header",
        "authorization: Bearer abc",
        "--push-secret",
        secret,
    ]);
    let d: Value = serde_json::from_str(&run(&["sub", "describe", "hooked"])).unwrap();
    assert_eq!(d["push"]["headers"]["authorization"], "Bearer abc", "{d}");
    assert_eq!(d["push"]["secret"], "(set; not shown)", "{d}");
    let (ok, _, err) = cli(
        &url,
        &[
            "sub",
            "create",
            "other",
            "--topic",
            "jobs",
            "--push-url",
            "http://127.0.0.1:9/hook",
            "--push-header",
            "no-colon",
        ],
        None,
    );
    assert!(!ok && err.contains("NAME:VALUE"), "{err}");
    run(&["sub", "delete", "hooked"]);
    server.terminate();
}

#[tokio::test]
async fn cli_manages_projections_and_metrics_show_their_lag() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    let run = |args: &[&str]| cli_ok(&url, args);
    run(&["topics", "create", "orders", "--partitions", "2"]);
    let out = run(&[
        "projection",
        "create",
        "spend",
        "--topic",
        "orders",
        "--reduce",
        r#"{"aggregate": {"n": "count()", "total": "sum(data.amount)"}}"#,
    ]);
    assert!(out.contains("projection spend on orders"), "{out}");
    for amount in [3, 4] {
        run(&[
            "publish",
            "orders",
            "--type",
            "order.paid",
            "--key",
            "alice",
            &format!("{{\"amount\": {amount}}}"),
        ]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let row = loop {
        let (ok, out, _) = cli(&url, &["projection", "get", "spend", "alice"], None);
        if ok {
            let row: Value = serde_json::from_str(&out).unwrap();
            if row["value"]["n"] == 2 {
                break row;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(row["value"]["total"], 7);
    let status: Value = serde_json::from_str(&run(&["projection", "get", "spend"])).unwrap();
    assert_eq!(status["status"], "running");
    let list = run(&["projection", "list"]);
    assert!(list.lines().nth(1).unwrap().starts_with("spend "), "{list}");
    assert!(run(&["projection", "rebuild", "spend"]).contains("rebuilding"));
    let (ok, _, err) = cli(
        &url,
        &[
            "projection",
            "create",
            "bad",
            "--topic",
            "orders",
            "--reduce",
            "{}",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("400") && err.contains("exactly one"), "{err}");

    // Metrics are exported every second.
    let body = metrics_after_export(&url).await;
    for line in [
        "spate_projection_lag_records{projection=\"spend\"} 0",
        "spate_projection_errors_total{projection=\"spend\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line} in\n{body}");
    }
    assert!(body.contains("spate_projection_records_applied_total{projection=\"spend\"}"));
    run(&["projection", "delete", "spend"]);
    server.terminate();
}

#[tokio::test]
async fn cli_manages_detectors_and_metrics_count_their_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    let run = |args: &[&str]| cli_ok(&url, args);
    run(&["topics", "create", "vitals", "--partitions", "1"]);
    let out = run(&[
        "detector",
        "create",
        "fever",
        "--topic",
        "vitals",
        "--series",
        "data.patient",
        "--value",
        "data.temp",
        "--algorithm",
        r#"{"kind": "threshold", "max": 39.5}"#,
        "--cooldown-ms",
        "0",
    ]);
    assert!(out.contains("detector fever on vitals"), "{out}");
    for temp in ["37.0", "40.1"] {
        run(&[
            "publish",
            "vitals",
            "--type",
            "vital.temp",
            "--key",
            "p1",
            &format!("{{\"patient\": \"p1\", \"temp\": {temp}}}"),
        ]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let status: Value = serde_json::from_str(&run(&["detector", "get", "fever"])).unwrap();
        if status["points"] == 2 {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status["alerts"], 1);
    let points: Value = serde_json::from_str(&run(&["detector", "get", "fever", "p1"])).unwrap();
    let temps: Vec<f64> = points["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(temps, [37.0, 40.1]);
    assert_eq!(points["points"][1]["alert"], true);
    let list = run(&["detector", "list"]);
    assert!(list.lines().nth(1).unwrap().starts_with("fever "), "{list}");
    let (ok, _, err) = cli(
        &url,
        &[
            "detector",
            "create",
            "bad",
            "--topic",
            "vitals",
            "--value",
            "data.temp",
            "--algorithm",
            r#"{"kind": "threshold"}"#,
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("400") && err.contains("min, max"), "{err}");

    // Metrics are exported every second.
    let body = metrics_after_export(&url).await;
    assert!(
        body.lines()
            .any(|l| l == "spate_detector_alerts_total{detector=\"fever\"} 1"),
        "{body}"
    );
    run(&["detector", "delete", "fever"]);
    let (ok, _, err) = cli(&url, &["detector", "get", "fever"], None);
    assert!(!ok && err.contains("404"), "{err}");
    server.terminate();
}

#[tokio::test]
async fn access_tokens_guard_http_websocket_sse_and_the_cli() {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let token = "ops-0123456789abcdef";
    std::fs::write(
        &tokens,
        format!("# who may connect\n{token}\nci-fedcba9876543210\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = common::start(&data, &["--auth-tokens-file", tokens.to_str().unwrap()]);
    let url = server.url.clone();
    let http = reqwest::Client::new();
    // Without a token, or with a wrong one: 401 with a Bearer challenge and problem details.
    for given in [None, Some("ops-0123456789abcdeX")] {
        let mut req = http.get(format!("{url}/v1/topics"));
        if let Some(t) = given {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            challenge.starts_with("Bearer realm=\"spate\""),
            "{challenge}"
        );
        assert_eq!(challenge.contains("invalid_token"), given.is_some());
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], 401);
    }
    for path in ["/metrics", "/v1/ws", "/v1/topics/t/sse", "/v1/nothing-here"] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    // Pages that hold no data stay open.
    for path in ["/healthz", "/", "/console/console.js", "/examples/live"] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // With a token in the header, or in the query (taken out before the handler's own checks).
    let r = http
        .post(format!("{url}/v1/topics"))
        .bearer_auth(token)
        .json(&serde_json::json!({"name": "t", "partitions": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{url}/v1/topics/t/events"))
        .header("authorization", "bearer ci-fedcba9876543210")
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"e1","source":"/s","type":"t.made"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .get(format!(
            "{url}/v1/topics/t/events?partition=0&access_token={token}&limit=5"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["events"][0]["event"]["id"], "e1");
    // A browser's EventSource and WebSocket put the token in the query.
    let mut sse = http
        .get(format!(
            "{url}/v1/topics/t/sse?from=earliest&access_token={token}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"e1\"") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), sse.chunk())
            .await
            .expect("an SSE message in time")
            .unwrap()
            .expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(sse);
    let ws_url = url.replace("http://", "ws://");
    assert!(
        tokio_tungstenite::connect_async(format!("{ws_url}/v1/ws"))
            .await
            .is_err(),
        "a WebSocket without a token is refused"
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{ws_url}/v1/ws?access_token={token}"))
            .await
            .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"op":"subscribe","id":"s","topic":"t","from":"earliest"}"#.into(),
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next_json(&mut ws).await);
    }
    assert_eq!(got[0]["op"], "subscribed");
    assert_eq!(got[1]["event"]["id"], "e1");
    // The CLI takes the token from --token or SPATE_TOKEN.
    let (ok, _, err) = cli(&url, &["topics", "list"], None);
    assert!(!ok && err.contains("401"), "{err}");
    let out = cli_ok(&url, &["topics", "list", "--token", token]);
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().next() == Some("t")),
        "{out}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["topics", "list", "--server", &url])
        .env("SPATE_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.terminate();

    // A token file with a bad line keeps the server from starting, and says which line.
    std::fs::write(&tokens, format!("{token}\nshort\n")).unwrap();
    let out = serve_to_exit(&data, &["--auth-tokens-file".as_ref(), tokens.as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && !err.contains(token), "{err}");
}

/// A server with TLS on both listeners (and `extra` flags), its self-signed certificate and key
/// written into `dir` as `cert.pem` and `key.pem`; the server and the certificate's PEM.
/// The next message of a WebSocket, as JSON, within 10 s.
async fn next_json<S>(ws: &mut S) -> Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .expect("a WebSocket message within 10 s")
        .expect("the WebSocket is open")
        .unwrap();
    serde_json::from_str(msg.to_text().unwrap()).unwrap()
}

fn start_tls(dir: &std::path::Path, extra: &[&str]) -> (common::Server, String) {
    let cert_pem = common::self_signed(dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend(extra);
    (common::start(&dir.join("data"), &args), cert_pem)
}

/// An HTTP client trusting `cert_pem`, giving up on a request after 5 s.
fn https_client(cert_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
}

/// The name TLS clients check the test servers' certificates against.
fn loopback() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap()
}

/// A TLS client trusting `cert_pem` alone, presenting the client certificate and key in the PEM
/// files `client` when given.
fn tls_connector(
    cert_pem: &str,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).unwrap()],
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// An ApiVersions v0 request over `stream`; its error code, after checking the correlation id.
async fn kafka_api_versions<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
) -> std::io::Result<i16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut body = Vec::new();
    body.extend(18i16.to_be_bytes()); // ApiVersions
    body.extend(0i16.to_be_bytes()); // version 0
    body.extend(41i32.to_be_bytes()); // correlation id
    body.extend(4i16.to_be_bytes());
    body.extend(b"test");
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend(body);
    stream.write_all(&frame).await?;
    let size = stream.read_i32().await?;
    let mut response = vec![0; size as usize];
    stream.read_exact(&mut response).await?;
    assert_eq!(
        response[..4],
        41i32.to_be_bytes(),
        "the correlation id comes back"
    );
    Ok(i16::from_be_bytes([response[4], response[5]]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_wss_and_kafka_and_refuses_plain_connections_and_bad_files() {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let (server, cert_pem) = start_tls(dir.path(), &[]);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let url = server.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let authority = url.trim_start_matches("https://").to_string();

    // Connections that never start their handshakes hold up no other (within the 10 s a
    // handshake may take, every request below has 5 s).
    let _stalled_http = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let _stalled_kafka = tokio::net::TcpStream::connect(&server.kafka).await.unwrap();

    // HTTPS with a client that trusts the certificate.
    let https = https_client(&cert_pem).build().unwrap();
    common::create_topic(&https, &url, "secure", 1).await;
    let r = https
        .post(format!("{url}/v1/topics/secure/events"))
        .json(
            &serde_json::json!({"specversion": "1.0", "id": "e1", "source": "/t",
            "type": "t.created", "data": {"n": 1}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A client that does not trust the certificate, and plain HTTP on the TLS port, get nothing.
    assert!(reqwest::get(format!("{url}/healthz")).await.is_err());
    let plain = reqwest::get(format!("http://{authority}/healthz")).await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP was served on the TLS port"
    );

    // WebSocket over TLS: the event published above, from the start of the topic.
    let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let server_name = loopback();
    let tls = tls_connector(&cert_pem, None)
        .connect(server_name.clone(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{authority}/v1/ws"), tls)
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"op":"subscribe","id":"s1","topic":"secure","from":"earliest"}"#.into(),
    ))
    .await
    .unwrap();
    let mut got = None;
    while got.is_none() {
        let v = next_json(&mut ws).await;
        if v["op"] == "event" {
            got = Some(v);
        }
    }
    assert_eq!(got.unwrap()["event"]["id"], "e1");

    // SSE over TLS: its first request is read to see where to serve it, then given back whole.
    let mut sse = https
        .get(format!("{url}/v1/topics/secure/sse?from=earliest"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), sse.chunk())
            .await
            .expect("an SSE message")
            .unwrap()
            .expect("the stream goes on");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.starts_with("id: 0:0@"), "{text}");
    assert!(text.contains("\"id\":\"e1\""), "{text}");
    drop(sse);

    // Kafka over TLS answers; a plain Kafka request on the TLS port is not answered.
    let tcp = tokio::net::TcpStream::connect(&server.kafka).await.unwrap();
    let mut kafka = tls_connector(&cert_pem, None)
        .connect(server_name, tcp)
        .await
        .unwrap();
    assert_eq!(kafka_api_versions(&mut kafka).await.unwrap(), 0);
    let mut plain = tokio::net::TcpStream::connect(&server.kafka).await.unwrap();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        kafka_api_versions(&mut plain),
    )
    .await
    .expect("the connection is closed within 10 s");
    assert!(
        answer.is_err(),
        "a plain request was answered on the TLS port"
    );

    // The CLI trusts the certificate through SSL_CERT_FILE.
    let out = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["topics", "list", "--server", &url])
        .env("SSL_CERT_FILE", &cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("secure"));
    // A stop does not wait out the stalled handshakes' 10 s.
    let stopping = std::time::Instant::now();
    assert_eq!(server.terminate().code(), Some(0));
    assert!(stopping.elapsed() < std::time::Duration::from_secs(5));

    // Refused starts: one file without the other, a missing file, a key of another certificate.
    let data = dir.path().join("refused");
    let other = tempfile::tempdir().unwrap();
    common::self_signed(other.path());
    for (args, expected) in [
        (
            vec!["--tls-cert", cert.to_str().unwrap()],
            "give both or neither".to_string(),
        ),
        (
            vec![
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                key.to_str().unwrap(),
            ],
            "cannot read the TLS certificate file /nonexistent/cert.pem".to_string(),
        ),
        (
            vec![
                "--tls-cert",
                key.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
            format!("{} holds no PEM certificate", key.display()),
        ),
        (
            vec![
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                other.path().join("key.pem").to_str().unwrap(),
            ],
            "does not fit the certificate".to_string(),
        ),
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let out = serve_to_exit(&data, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    common::client_certificates(dir.path());
    let file = |name: &str| dir.path().join(name);
    let arg = |name: &str| file(name).to_str().unwrap().to_string();
    let (cert, key, ca) = (arg("cert.pem"), arg("key.pem"), arg("client-ca.pem"));
    let (server, cert_pem) = start_tls(dir.path(), &["--tls-client-ca", &ca]);
    let url = server.url.clone();
    let https = |identity: Option<&str>| {
        let mut b = https_client(&cert_pem);
        if let Some(name) = identity {
            let mut pem = std::fs::read(file(&format!("{name}.pem"))).unwrap();
            pem.extend(std::fs::read(file(&format!("{name}-key.pem"))).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    // HTTPS: the client the CA issued is served; no certificate or another CA's is not.
    common::create_topic(&https(Some("client")), &url, "mutual", 1).await;
    for who in [None, Some("stranger")] {
        assert!(
            https(who)
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_err(),
            "{who:?} was served"
        );
    }
    // Kafka: the same.
    let server_name = loopback();
    for (who, served) in [
        (Some("client"), true),
        (None, false),
        (Some("stranger"), false),
    ] {
        let (c, k) = who.map_or((None, None), |n| {
            (
                Some(file(&format!("{n}.pem"))),
                Some(file(&format!("{n}-key.pem"))),
            )
        });
        let identity = c.as_deref().zip(k.as_deref());
        let tcp = tokio::net::TcpStream::connect(&server.kafka).await.unwrap();
        let answer = match tls_connector(&cert_pem, identity)
            .connect(server_name.clone(), tcp)
            .await
        {
            // Under TLS 1.3 the client finishes its side before the server judges its certificate.
            Ok(mut tls) => kafka_api_versions(&mut tls).await,
            Err(e) => Err(e),
        };
        assert_eq!(answer.is_ok(), served, "{who:?}: {answer:?}");
    }
    assert_eq!(server.terminate().code(), Some(0));
    // Refused starts: a client CA without TLS, a missing client CA file.
    let data = dir.path().join("refused");
    for (args, expected) in [
        (
            vec!["--tls-client-ca", ca.as_str()],
            "tls_client_ca_file needs TLS",
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                "/nonexistent/ca.pem",
            ],
            "cannot read the TLS client CA file /nonexistent/ca.pem",
        ),
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let out = serve_to_exit(&data, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_reads_and_consumes_but_changes_nothing() {
    use futures_util::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let (full, reader) = ("full-0123456789abcdef", "reader-0123456789abcdef");
    std::fs::write(&tokens, format!("{full}\n{reader} read-only\n")).unwrap();
    let server = common::start(
        &dir.path().join("data"),
        &["--auth-tokens-file", tokens.to_str().unwrap()],
    );
    let url = server.url.clone();
    let http = reqwest::Client::new();
    let send = |token: &'static str, method: reqwest::Method, path: &str, body: Value| {
        http.request(method, format!("{url}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    use reqwest::Method;
    let event = |id: &str| serde_json::json!({"specversion": "1.0", "id": id, "source": "/t", "type": "t.x", "data": {}});
    // The full token sets up a topic, an event and a subscription.
    let r = send(
        full,
        Method::POST,
        "/v1/topics",
        serde_json::json!({"name": "ro", "partitions": 1}),
    );
    assert_eq!(r.await.unwrap().status(), 201);
    let r = send(full, Method::POST, "/v1/topics/ro/events", event("e1"));
    assert_eq!(r.await.unwrap().status(), 201);
    let r = send(
        full,
        Method::PUT,
        "/v1/subscriptions/ro-sub",
        serde_json::json!({"topic": "ro", "from": "earliest"}),
    );
    assert_eq!(r.await.unwrap().status(), 201);
    // The read-only token: every write or definition change is 403, and changes nothing.
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/topics",
            serde_json::json!({"name": "other", "partitions": 1}),
        ),
        (Method::POST, "/v1/topics/ro/events", event("e2")),
        (Method::POST, "/v1/topics/ro/streams/s1/events", event("e3")),
        (Method::DELETE, "/v1/topics/ro", Value::Null),
        (
            Method::POST,
            "/v1/topics/ro/truncate",
            serde_json::json!({"before": {"0": 1}}),
        ),
        (
            Method::PUT,
            "/v1/subscriptions/other",
            serde_json::json!({"topic": "ro"}),
        ),
        (Method::DELETE, "/v1/subscriptions/ro-sub", Value::Null),
        (
            Method::POST,
            "/v1/subscriptions/ro-sub/seek",
            serde_json::json!({"to": "earliest"}),
        ),
        (
            Method::POST,
            "/v1/subscriptions/ro-sub/redrive",
            serde_json::json!({}),
        ),
    ] {
        let r = send(reader, method.clone(), path, body).await.unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["type"], "urn:spate:problem:forbidden", "{method} {path}");
    }
    // It reads and consumes.
    let r = send(reader, Method::GET, "/v1/topics/ro/events", Value::Null);
    let page: Value = r.await.unwrap().json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    let r = send(
        reader,
        Method::POST,
        "/v1/subscriptions/ro-sub/pull",
        serde_json::json!({"max_messages": 10, "wait_ms": 2000}),
    );
    let pulled: Value = r.await.unwrap().json().await.unwrap();
    let ack_id = pulled["messages"][0]["ack_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = send(
        reader,
        Method::POST,
        "/v1/subscriptions/ro-sub/ack",
        serde_json::json!({"ack_ids": [ack_id]}),
    );
    let acked: Value = r.await.unwrap().json().await.unwrap();
    assert_eq!(acked["results"][0]["result"], "ok", "{acked}");
    // Over a WebSocket it subscribes, and its publish is refused with a reason.
    let ws_url = url.replacen("http", "ws", 1);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{ws_url}/v1/ws?access_token={reader}"))
            .await
            .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(
        r#"{"op":"publish","topic":"ro","ref":"r1","event":{"specversion":"1.0","id":"w1","source":"/t","type":"t.x"}}"#.into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(
        r#"{"op":"subscribe","id":"s1","topic":"ro","from":"earliest"}"#.into(),
    ))
    .await
    .unwrap();
    let (mut refused, mut received) = (None, None);
    while refused.is_none() || received.is_none() {
        let v = next_json(&mut ws).await;
        match v["op"].as_str() {
            Some("error") => refused = Some(v),
            Some("event") => received = Some(v),
            _ => {}
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(refused["ref"], "r1", "{refused}");
    assert_eq!(received.unwrap()["event"]["id"], "e1");
    // Nothing the read-only token tried was written.
    let r = send(full, Method::GET, "/v1/topics", Value::Null);
    let topics: Value = r.await.unwrap().json().await.unwrap();
    let names: Vec<&str> = topics["topics"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .filter(|n| !n.starts_with("__"))
        .collect();
    assert_eq!(names, ["ro"], "{topics}");
    let r = send(full, Method::GET, "/v1/topics/ro/events", Value::Null);
    let page: Value = r.await.unwrap().json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    let r = send(full, Method::GET, "/v1/subscriptions", Value::Null);
    let subs: Value = r.await.unwrap().json().await.unwrap();
    assert_eq!(subs["subscriptions"].as_array().unwrap().len(), 1, "{subs}");
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate_and_keeps_the_current_one_when_the_files_are_bad() {
    let dir = tempfile::tempdir().unwrap();
    let (server, first) = start_tls(dir.path(), &[]);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let authority = server.url.trim_start_matches("https://").to_string();
    // Whether a client trusting `pem` alone completes a handshake on the HTTP port.
    let trusted = |pem: String| {
        let authority = authority.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
            let name = loopback();
            tls_connector(&pem, None).connect(name, tcp).await.is_ok()
        }
    };
    assert!(trusted(first.clone()).await);
    // A renewed certificate in the same files: served after SIGHUP, to new connections.
    let renewed = tempfile::tempdir().unwrap();
    let second = common::self_signed(renewed.path());
    std::fs::copy(renewed.path().join("cert.pem"), &cert).unwrap();
    std::fs::copy(renewed.path().join("key.pem"), &key).unwrap();
    assert!(trusted(first.clone()).await, "served before the SIGHUP");
    server.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !trusted(second.clone()).await {
        assert!(std::time::Instant::now() < deadline, "not reloaded in 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!trusted(first).await, "the old certificate is still served");
    // Bad files, the current certificate stays: no key.
    std::fs::write(&key, "not a key").unwrap();
    server.signal(libc::SIGHUP);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(trusted(second.clone()).await);
    // A key of another certificate.
    let other = tempfile::tempdir().unwrap();
    common::self_signed(other.path());
    std::fs::copy(other.path().join("key.pem"), &key).unwrap();
    server.signal(libc::SIGHUP);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(trusted(second).await);
    assert_eq!(server.terminate().code(), Some(0));
    // Without TLS, SIGHUP reloads nothing and does not stop the server.
    let plain = common::start(&dir.path().join("plain"), &[]);
    plain.signal(libc::SIGHUP);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = reqwest::get(format!("{}/healthz", plain.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(plain.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_responses_over_tls_arrive_whole_when_the_client_reads_late() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{ApiKey, FetchRequest, RequestHeader, TopicName};
    use kafka_protocol::protocol::{Encodable, HeaderVersion, StrBytes};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (server, cert_pem) = start_tls(dir.path(), &[]);
    let https = https_client(&cert_pem).build().unwrap();
    common::create_topic(&https, &server.url, "big", 1).await;
    // About 2 MB in the partition.
    let pad = "x".repeat(100_000);
    let events: Vec<Value> = (0..20)
        .map(|i| {
            serde_json::json!({"specversion": "1.0", "id": format!("e{i}"), "source": "/t",
                "type": "t.big", "data": {"pad": pad}})
        })
        .collect();
    common::publish_batch(&https, &server.url, "big", &events).await;
    // Sixteen fetches of all of it, pipelined, and nothing read until the socket is full: each
    // response must still arrive whole once the client reads.
    let tcp = tokio::net::TcpStream::connect(&server.kafka).await.unwrap();
    let name = loopback();
    let mut tls = tls_connector(&cert_pem, None)
        .connect(name, tcp)
        .await
        .unwrap();
    let fetch = FetchRequest::default()
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(4 << 20)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("big")))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(4 << 20),
                ]),
        ]);
    for id in 1..=16 {
        let mut body = bytes::BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::Fetch as i16)
            .with_request_api_version(12)
            .with_correlation_id(id)
            .encode(&mut body, FetchRequest::header_version(12))
            .unwrap();
        fetch.encode(&mut body, 12).unwrap();
        tls.write_all(&(body.len() as i32).to_be_bytes())
            .await
            .unwrap();
        tls.write_all(&body).await.unwrap();
    }
    tls.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let read_all = async {
        let mut total = 0;
        for id in 1..=16i32 {
            let size = tls.read_i32().await.unwrap();
            let mut response = vec![0; size as usize];
            tls.read_exact(&mut response).await.unwrap();
            assert_eq!(response[..4], id.to_be_bytes(), "responses come in order");
            total += response.len();
        }
        total
    };
    let total = tokio::time::timeout(std::time::Duration::from_secs(30), read_all)
        .await
        .expect("every response arrives within 30 s");
    assert!(total > 16 * 2_000_000, "{total} bytes");
    assert_eq!(server.terminate().code(), Some(0));
}
