//! `spate detector`: detectors from the command line, over the HTTP API.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::client::Client;

#[derive(clap::Subcommand)]
pub enum DetectorCommand {
    /// Create or replace a detector.
    Create {
        name: String,
        #[arg(long)]
        topic: String,
        /// CEL giving the value, e.g. data.temperature.
        #[arg(long)]
        value: String,
        /// CEL giving the series name, e.g. data.sensor_id [default: one series].
        #[arg(long)]
        series: Option<String>,
        /// The algorithm as JSON, e.g. '{"kind": "auto"}' or
        /// '{"kind": "threshold", "max": 39.5, "for_ms": 30000}'.
        #[arg(long)]
        algorithm: String,
        /// A CEL filter over the event.
        #[arg(long)]
        filter: Option<String>,
        /// A type pattern (`sensor.*`, `sensor.>`).
        #[arg(long)]
        types: Option<String>,
        /// Where alerts go [default: alerts].
        #[arg(long)]
        alert_topic: Option<String>,
        /// Quiet time per series after an alert [default: 60000].
        #[arg(long)]
        cooldown_ms: Option<u64>,
        /// Series tracked at most [default: 10000].
        #[arg(long)]
        max_series: Option<u64>,
        /// earliest or latest [default: earliest].
        #[arg(long)]
        from: Option<String>,
    },
    /// List detectors with their status.
    List,
    /// Show a detector's status, or one series' recent points, as JSON.
    Get {
        name: String,
        series: Option<String>,
    },
    /// Delete a detector (its alerts stay).
    Delete { name: String },
}

pub async fn run(c: &Client, command: DetectorCommand) -> Result<()> {
    match command {
        DetectorCommand::Create {
            name,
            topic,
            value,
            series,
            algorithm,
            filter,
            types,
            alert_topic,
            cooldown_ms,
            max_series,
            from,
        } => {
            let algorithm: Value =
                serde_json::from_str(&algorithm).context("--algorithm must be a JSON object")?;
            let mut def = json!({"topic": topic, "value": value, "algorithm": algorithm});
            crate::client::set_given(
                &mut def,
                [
                    ("series", series.map(Value::from)),
                    ("filter", filter.map(Value::from)),
                    ("types", types.map(Value::from)),
                    ("alert_topic", alert_topic.map(Value::from)),
                    ("from", from.map(Value::from)),
                    ("cooldown_ms", cooldown_ms.map(Value::from)),
                    ("max_series", max_series.map(Value::from)),
                ],
            );
            let s = c
                .send(
                    c.http()
                        .put(c.url(&format!("/v1/detectors/{name}")))
                        .json(&def),
                )
                .await?;
            println!(
                "detector {name} on {topic}: {}",
                s["status"].as_str().unwrap_or("?")
            );
        }
        DetectorCommand::List => {
            let body = c.send(c.http().get(c.url("/v1/detectors"))).await?;
            println!(
                "{:<32} {:<10} {:<24} {:>8} {:>10} {:>8} {:>10}",
                "DETECTOR", "KIND", "TOPIC", "SERIES", "POINTS", "ALERTS", "LAG"
            );
            for d in body["detectors"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:<10} {:<24} {:>8} {:>10} {:>8} {:>10}",
                    d["name"].as_str().unwrap_or(""),
                    d["definition"]["algorithm"]["kind"].as_str().unwrap_or(""),
                    d["definition"]["topic"].as_str().unwrap_or(""),
                    d["series"],
                    d["points"],
                    d["alerts"],
                    d["lag_records"]
                );
                if let Some(e) = d["error"].as_str() {
                    println!("  ! {e}");
                }
            }
        }
        DetectorCommand::Get { name, series } => {
            let path = match series {
                Some(s) => format!("/v1/detectors/{name}/series/{s}"),
                None => format!("/v1/detectors/{name}"),
            };
            let v = c.send(c.http().get(c.url(&path))).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        DetectorCommand::Delete { name } => {
            c.send(c.http().delete(c.url(&format!("/v1/detectors/{name}"))))
                .await?;
            println!("deleted detector {name}");
        }
    }
    Ok(())
}
