//! Starting and stopping the real `spate` binary for whole-server tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub url: String,
    /// The Kafka listener's `host:port`.
    pub kafka: String,
}

/// Starts `spate serve` on a free loopback port and waits (bounded) until it prints its address.
pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
    start_env(data_dir, extra, &[])
}

/// As [`start`], with extra environment variables (settings such as `SPATE_METRICS_INTERVAL_MS`).
pub fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--http-addr", "127.0.0.1:0"])
        .args(if extra.contains(&"--kafka-addr") {
            &[][..]
        } else {
            &["--kafka-addr", "127.0.0.1:0"][..]
        })
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the spate binary starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            for (prefix, kind) in [("http: ", "http"), ("kafka: ", "kafka")] {
                if let Some(value) = line.strip_prefix(prefix) {
                    let _ = tx.send((kind, value.to_string()));
                }
            }
        }
    });
    let mut next = |what: &str| {
        let (kind, value) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "spate did not print its addresses within 30 s (status {:?})",
                    child.try_wait()
                )
            });
        assert_eq!(kind, what, "addresses are printed http first, then kafka");
        value
    };
    let url = next("http");
    let kafka = next("kafka");
    Server { child, url, kafka }
}

impl Server {
    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill the server");
        self.child.wait().expect("reap the server");
    }

    /// Sends `signal` (a `libc::SIG*`) to the server.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: sending a signal to our own child process, which has not been reaped yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the server") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "spate did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a program of `tests/interop/` with an interpreter and returns its output; fails the test,
/// with the program's output, when it fails.
pub fn interop(interpreter: &str, program: &str, args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop");
    let out = Command::new(interpreter)
        .current_dir(&dir)
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{interpreter} cannot run ({e}); scripts/test installs the clients")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// xorshift64*: a small seeded generator, so a seed reproduces a run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// What a kill -9 loop starts from: its cycles (from the environment variable it names, 20 by
/// default), the seed and a generator seeded with it, a data directory and an HTTP client.
pub struct CrashLoop {
    pub cycles: usize,
    pub seed: u64,
    pub rng: Rng,
    pub data: std::path::PathBuf,
    pub client: reqwest::Client,
    /// Holds the data directory; removed when dropped.
    pub dir: tempfile::TempDir,
}

impl CrashLoop {
    pub fn new(cycles_var: &str, what: &str) -> CrashLoop {
        let cycles = std::env::var(cycles_var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let seed = seed();
        println!(
            "{what} kill -9 loop: {cycles} cycles, seed {seed} (SPATE_CRASH_SEED={seed} reproduces)"
        );
        let dir = tempfile::tempdir().unwrap();
        CrashLoop {
            cycles,
            seed,
            rng: Rng(seed | 1),
            data: dir.path().join("data"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            dir,
        }
    }
}

/// Creates a topic over HTTP, expecting 201.
pub async fn create_topic(client: &reqwest::Client, url: &str, name: &str, partitions: u32) {
    let r = client
        .post(format!("{url}/v1/topics"))
        .json(&serde_json::json!({"name": name, "partitions": partitions}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "create topic {name}");
}

/// Publishes a batch of CloudEvents to `topic` and checks that it was accepted.
pub async fn publish_batch(
    client: &reqwest::Client,
    url: &str,
    topic: &str,
    events: &[serde_json::Value],
) {
    let r = client
        .post(format!("{url}/v1/topics/{topic}/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(events).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "publish to {topic}");
}

/// The seed of a randomized test: `SPATE_CRASH_SEED`, or one from the clock.
pub fn seed() -> u64 {
    std::env::var("SPATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Every event of `topic` over HTTP, as (partition, offset, event), partition by partition in
/// offset order.
pub async fn read_topic(
    client: &reqwest::Client,
    url: &str,
    topic: &str,
    partitions: u64,
) -> Vec<(u64, u64, serde_json::Value)> {
    let mut all = Vec::new();
    for p in 0..partitions {
        let mut offset = 0;
        loop {
            let page: serde_json::Value = client
                .get(format!(
                    "{url}/v1/topics/{topic}/events?partition={p}&offset={offset}&limit=1000"
                ))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let events = page["events"].as_array().unwrap();
            if events.is_empty() {
                break;
            }
            for e in events {
                all.push((p, e["offset"].as_u64().unwrap(), e["event"].clone()));
            }
            offset = page["next_offset"].as_u64().unwrap();
        }
    }
    all
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as `cert.pem` and `key.pem`
/// into `dir`; the certificate's PEM.
pub fn self_signed(dir: &std::path::Path) -> String {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = generated.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), generated.key_pair.serialize_pem()).unwrap();
    cert
}

/// Client certificates for mutual TLS, written into `dir`: a CA (`client-ca.pem`), a client
/// certificate it issued (`client.pem`, `client-key.pem`) and one another CA issued
/// (`stranger.pem`, `stranger-key.pem`).
pub fn client_certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    use rcgen::{DnType, KeyUsagePurpose};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.self_signed(&key).unwrap(), key)
    };
    let client = |file: &str, issuer: &(rcgen::Certificate, KeyPair)| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["client.example".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer.0, &issuer.1).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
    };
    let (ours, theirs) = (ca("client CA"), ca("another CA"));
    std::fs::write(dir.join("client-ca.pem"), ours.0.pem()).unwrap();
    client("client", &ours);
    client("stranger", &theirs);
}
