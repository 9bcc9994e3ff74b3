//! `spate projection`: projections from the command line, over the HTTP API.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::client::Client;

#[derive(clap::Subcommand)]
pub enum ProjectionCommand {
    /// Create or change a projection.
    Create {
        name: String,
        #[arg(long)]
        topic: String,
        /// The reducer as JSON, e.g. '{"aggregate": {"n": "count()"}}' or '{"merge": true}'.
        #[arg(long)]
        reduce: String,
        /// A CEL filter over the event.
        #[arg(long)]
        filter: Option<String>,
        /// A type pattern (`order.*`, `order.>`).
        #[arg(long)]
        types: Option<String>,
        /// A CEL expression giving the row key [default: the event's partitionkey].
        #[arg(long)]
        key: Option<String>,
        /// halt or skip.
        #[arg(long)]
        on_error: Option<String>,
    },
    /// List projections with their status and lag.
    List,
    /// Show a projection's status, or one of its rows, as JSON.
    Get { name: String, key: Option<String> },
    /// Fold the projection again from the start of its topic.
    Rebuild { name: String },
    /// Delete a projection and its rows.
    Delete { name: String },
}

pub async fn run(c: &Client, command: ProjectionCommand) -> Result<()> {
    match command {
        ProjectionCommand::Create {
            name,
            topic,
            reduce,
            filter,
            types,
            key,
            on_error,
        } => {
            let reduce: Value =
                serde_json::from_str(&reduce).context("--reduce must be a JSON object")?;
            let mut def = json!({"topic": topic, "reduce": reduce});
            crate::client::set_given(
                &mut def,
                [
                    ("filter", filter.map(Value::from)),
                    ("types", types.map(Value::from)),
                    ("key", key.map(Value::from)),
                    ("on_error", on_error.map(Value::from)),
                ],
            );
            let s = c
                .send(
                    c.http()
                        .put(c.url(&format!("/v1/projections/{name}")))
                        .json(&def),
                )
                .await?;
            println!(
                "projection {name} on {topic}: {}",
                s["status"].as_str().unwrap_or("?")
            );
        }
        ProjectionCommand::List => {
            let body = c.send(c.http().get(c.url("/v1/projections"))).await?;
            println!(
                "{:<32} {:<24} {:<10} {:>12} {:>8}",
                "PROJECTION", "TOPIC", "STATUS", "LAG", "ERRORS"
            );
            for p in body["projections"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:<24} {:<10} {:>12} {:>8}",
                    p["name"].as_str().unwrap_or(""),
                    p["definition"]["topic"].as_str().unwrap_or(""),
                    p["status"].as_str().unwrap_or(""),
                    p["lag_records"],
                    p["errors"]
                );
            }
        }
        ProjectionCommand::Get { name, key } => {
            let path = match key {
                Some(k) => format!("/v1/projections/{name}/rows/{k}"),
                None => format!("/v1/projections/{name}"),
            };
            let v = c.send(c.http().get(c.url(&path))).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ProjectionCommand::Rebuild { name } => {
            c.send(
                c.http()
                    .post(c.url(&format!("/v1/projections/{name}/rebuild"))),
            )
            .await?;
            println!("rebuilding projection {name}");
        }
        ProjectionCommand::Delete { name } => {
            c.send(c.http().delete(c.url(&format!("/v1/projections/{name}"))))
                .await?;
            println!("deleted projection {name}");
        }
    }
    Ok(())
}
