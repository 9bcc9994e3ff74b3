//! Server configuration: defaults, then an optional TOML file (`--config`), then `SPATE_*`
//! environment variables, then command-line flags; later sources win.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use spate_log::FsyncPolicy;

/// The settings of `spate serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// The Kafka listener.
    pub kafka_addr: SocketAddr,
    /// The `host:port` Kafka clients are told to connect to; the listen address when unset.
    pub kafka_advertised_addr: Option<String>,
    /// Create unknown topics when Kafka clients ask for them (Metadata, Produce).
    pub auto_create_topics: bool,
    /// `batch`, `interval:<ms>` or `never`.
    pub fsync: String,
    pub max_event_bytes: u64,
    pub max_request_bytes: u64,
    pub max_connections: usize,
    /// How often retention runs, in milliseconds.
    pub retention_check_ms: u64,
    /// Truncate corruption found on open instead of refusing to start.
    pub repair: bool,
    /// A WebSocket or SSE subscriber behind the live tail for longer than this is disconnected.
    pub push_max_behind_ms: u64,
    /// How often the server writes its own metrics to the `__metrics` topic (0: never).
    pub metrics_interval_ms: u64,
    /// Segment files are extended with zeros this many bytes ahead of the appends, so that an
    /// fsync does not also commit a new file length (0: off).
    pub preallocate_bytes: u64,
    /// How long the first rebalance of an empty Kafka consumer group waits for more members to
    /// join before it assigns partitions (Kafka's `group.initial.rebalance.delay.ms`).
    pub group_initial_rebalance_delay_ms: u64,
    /// A file of access tokens (one per line): when set, HTTP requests and Kafka connections
    /// must present one (see docs/security.md).
    pub auth_tokens_file: Option<PathBuf>,
    /// A PEM certificate chain (leaf first): with `tls_key_file`, both listeners serve TLS only.
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: with TLS, clients must present a certificate one of them issued.
    pub tls_client_ca_file: Option<PathBuf>,
}

/// The longest initial rebalance delay accepted: 5 minutes, the Java consumer's default rebalance
/// timeout (`max.poll.interval.ms`), past which its JoinGroup would give up first.
const GROUP_INITIAL_REBALANCE_DELAY_MAX_MS: u64 = 300_000;

/// Every key the file and the environment may set.
pub const KEYS: [&str; 19] = [
    "data_dir",
    "http_addr",
    "kafka_addr",
    "kafka_advertised_addr",
    "auto_create_topics",
    "fsync",
    "max_event_bytes",
    "max_request_bytes",
    "max_connections",
    "retention_check_ms",
    "repair",
    "push_max_behind_ms",
    "metrics_interval_ms",
    "preallocate_bytes",
    "group_initial_rebalance_delay_ms",
    "auth_tokens_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
];

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("./spate-data"),
            http_addr: "127.0.0.1:7070".parse().expect("valid address"),
            kafka_addr: "127.0.0.1:9092".parse().expect("valid address"),
            kafka_advertised_addr: None,
            auto_create_topics: false,
            fsync: "batch".into(),
            max_event_bytes: 1 << 20,
            max_request_bytes: 16 << 20,
            max_connections: 10_000,
            retention_check_ms: 30_000,
            repair: false,
            push_max_behind_ms: 60_000,
            metrics_interval_ms: 5_000,
            preallocate_bytes: 1 << 20,
            group_initial_rebalance_delay_ms: 300,
            auth_tokens_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
        }
    }
}

/// Flags given on the command line; `None` leaves the setting to the other sources.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_advertised_addr: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub auto_create_topics: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsync: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_event_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_tokens_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
}

impl ServeConfig {
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<ServeConfig> {
        let mut fig = Figment::from(Serialized::defaults(ServeConfig::default()));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            fig = fig.merge(Toml::file(file));
        }
        let config: ServeConfig = fig
            .merge(Env::prefixed("SPATE_").only(&KEYS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .context("invalid configuration")?;
        config.fsync_policy()?;
        anyhow::ensure!(
            config.max_event_bytes > 0,
            "max_event_bytes must be positive"
        );
        anyhow::ensure!(
            config.max_event_bytes <= spate_log::config::MESSAGE_BYTES_MAX,
            "max_event_bytes must be at most {}",
            spate_log::config::MESSAGE_BYTES_MAX
        );
        anyhow::ensure!(
            config.max_request_bytes >= config.max_event_bytes,
            "max_request_bytes must be at least max_event_bytes"
        );
        anyhow::ensure!(
            config.max_connections > 0,
            "max_connections must be positive"
        );
        anyhow::ensure!(
            config.push_max_behind_ms > 0,
            "push_max_behind_ms must be positive"
        );
        anyhow::ensure!(
            config.retention_check_ms > 0,
            "retention_check_ms must be positive"
        );
        anyhow::ensure!(
            config.group_initial_rebalance_delay_ms <= GROUP_INITIAL_REBALANCE_DELAY_MAX_MS,
            "group_initial_rebalance_delay_ms must be at most {GROUP_INITIAL_REBALANCE_DELAY_MAX_MS}"
        );
        anyhow::ensure!(
            config.tls_cert_file.is_some() == config.tls_key_file.is_some(),
            "tls_cert_file and tls_key_file go together: give both or neither"
        );
        anyhow::ensure!(
            config.tls_client_ca_file.is_none() || config.tls_cert_file.is_some(),
            "tls_client_ca_file needs TLS: give tls_cert_file and tls_key_file too"
        );
        Ok(config)
    }

    pub fn fsync_policy(&self) -> Result<FsyncPolicy> {
        self.fsync
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))
            .context("invalid fsync setting")
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's test jail fixes the closure's error type
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "spate.toml",
                "http_addr = \"127.0.0.1:8000\"\nfsync = \"interval:50\"\n",
            )?;
            jail.set_env("SPATE_MAX_CONNECTIONS", "7");
            jail.set_env("SPATE_SERVER", "http://ignored");
            let flags = Overrides {
                fsync: Some("never".into()),
                ..Overrides::default()
            };
            let c = ServeConfig::load(Some(Path::new("spate.toml")), &flags)
                .map_err(|e| e.to_string())?;
            assert_eq!(c.http_addr, "127.0.0.1:8000".parse().unwrap());
            assert_eq!(c.fsync, "never");
            assert_eq!(c.max_connections, 7);
            assert_eq!(c.data_dir, PathBuf::from("./spate-data"));
            assert_eq!(c.kafka_addr, "127.0.0.1:9092".parse().unwrap());
            Ok(())
        });
    }

    #[test]
    fn bad_settings_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "colour = \"blue\"\n")?;
            assert!(ServeConfig::load(Some(Path::new("bad.toml")), &Overrides::default()).is_err());
            assert!(
                ServeConfig::load(Some(Path::new("missing.toml")), &Overrides::default()).is_err()
            );
            let flags = Overrides {
                fsync: Some("sometimes".into()),
                ..Overrides::default()
            };
            assert!(ServeConfig::load(None, &flags).is_err());
            jail.create_file("slow.toml", "group_initial_rebalance_delay_ms = 300001\n")?;
            let e =
                ServeConfig::load(Some(Path::new("slow.toml")), &Overrides::default()).unwrap_err();
            assert!(
                format!("{e:#}").contains("group_initial_rebalance_delay_ms"),
                "{e:#}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_group_rebalance_delay_comes_from_the_file_or_the_environment() {
        figment::Jail::expect_with(|jail| {
            let c = ServeConfig::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.group_initial_rebalance_delay_ms, 300);
            jail.create_file("spate.toml", "group_initial_rebalance_delay_ms = 3000\n")?;
            let c = ServeConfig::load(Some(Path::new("spate.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(c.group_initial_rebalance_delay_ms, 3000);
            jail.set_env("SPATE_GROUP_INITIAL_REBALANCE_DELAY_MS", "0");
            let c = ServeConfig::load(Some(Path::new("spate.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(c.group_initial_rebalance_delay_ms, 0);
            Ok(())
        });
    }
}
