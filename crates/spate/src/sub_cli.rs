//! `spate sub`: durable subscriptions from the command line, over the HTTP API.

use anyhow::Result;
use serde_json::{Value, json};

use crate::client::Client;

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum SubCommand {
    /// Create or update a subscription.
    Create {
        name: String,
        #[arg(long)]
        topic: String,
        /// A CEL filter over the event.
        #[arg(long)]
        filter: Option<String>,
        /// A type pattern (`order.*`, `order.>`).
        #[arg(long)]
        types: Option<String>,
        /// earliest, latest or an RFC 3339 time [default: latest].
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        ack_timeout_ms: Option<u64>,
        #[arg(long)]
        max_attempts: Option<u32>,
        #[arg(long)]
        dead_letter_topic: Option<String>,
        /// none or key.
        #[arg(long)]
        ordering: Option<String>,
        /// POST each message to this URL (CloudEvents binary mode) instead of waiting for pulls.
        #[arg(long)]
        push_url: Option<String>,
        /// A header for every webhook request, `NAME:VALUE` (repeatable), e.g.
        /// `authorization:Bearer …`.
        #[arg(long = "push-header", requires = "push_url")]
        push_headers: Vec<String>,
        /// Sign webhook requests (Standard Webhooks) with this secret: `whsec_` and a key of 24 to
        /// 64 bytes in base64.
        #[arg(long, requires = "push_url")]
        push_secret: Option<String>,
    },
    /// List subscriptions with their backlog.
    List,
    /// Show a subscription's definition and live counts as JSON.
    Describe { name: String },
    /// Delete a subscription.
    Delete { name: String },
    /// Pull messages and print them as JSON lines; `--ack` acks them once printed.
    Pull {
        name: String,
        #[arg(long, default_value_t = 10)]
        max: usize,
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
        #[arg(long)]
        ack: bool,
    },
    /// Give parked dead letters back to the subscription.
    Redrive {
        name: String,
        /// Only dead letters matching this CEL filter.
        #[arg(long)]
        filter: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

pub async fn run(c: &Client, command: SubCommand) -> Result<()> {
    match command {
        SubCommand::Create {
            name,
            topic,
            filter,
            types,
            from,
            ack_timeout_ms,
            max_attempts,
            dead_letter_topic,
            ordering,
            push_url,
            push_headers,
            push_secret,
        } => {
            let mut spec = json!({ "topic": topic });
            let push = match push_url {
                None => None,
                Some(url) => {
                    let mut headers = serde_json::Map::new();
                    for h in push_headers {
                        let (name, value) = h.split_once(':').ok_or_else(|| {
                            anyhow::anyhow!("--push-header {h:?} is not NAME:VALUE")
                        })?;
                        headers.insert(name.trim().to_string(), value.trim().into());
                    }
                    let mut push = json!({ "url": url });
                    if !headers.is_empty() {
                        push["headers"] = Value::Object(headers);
                    }
                    if let Some(secret) = push_secret {
                        push["secret"] = secret.into();
                    }
                    Some(push)
                }
            };
            crate::client::set_given(
                &mut spec,
                [
                    ("filter", filter.map(Value::from)),
                    ("types", types.map(Value::from)),
                    ("from", from.map(Value::from)),
                    ("ack_timeout_ms", ack_timeout_ms.map(Value::from)),
                    ("max_attempts", max_attempts.map(Value::from)),
                    ("dead_letter_topic", dead_letter_topic.map(Value::from)),
                    ("ordering", ordering.map(Value::from)),
                    ("push", push),
                ],
            );
            let s = c
                .send(
                    c.http()
                        .put(c.url(&format!("/v1/subscriptions/{name}")))
                        .json(&spec),
                )
                .await?;
            println!(
                "subscription {name} on {} (dead letters to {})",
                s["topic"].as_str().unwrap_or("?"),
                s["dead_letter_topic"].as_str().unwrap_or("?")
            );
        }
        SubCommand::List => {
            let body = c.send(c.http().get(c.url("/v1/subscriptions"))).await?;
            println!(
                "{:<32} {:<24} {:>10} {:>10} {:>12} {:>12}",
                "SUBSCRIPTION", "TOPIC", "BACKLOG", "IN FLIGHT", "ACKED", "DEAD LETTERS"
            );
            for s in body["subscriptions"].as_array().into_iter().flatten() {
                let st = &s["stats"];
                println!(
                    "{:<32} {:<24} {:>10} {:>10} {:>12} {:>12}",
                    s["name"].as_str().unwrap_or(""),
                    s["topic"].as_str().unwrap_or(""),
                    st["backlog"],
                    st["in_flight"],
                    st["acked"],
                    st["dead_lettered"]
                );
            }
        }
        SubCommand::Describe { name } => {
            let s = c
                .send(c.http().get(c.url(&format!("/v1/subscriptions/{name}"))))
                .await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        SubCommand::Delete { name } => {
            c.send(c.http().delete(c.url(&format!("/v1/subscriptions/{name}"))))
                .await?;
            println!("deleted subscription {name}");
        }
        SubCommand::Pull {
            name,
            max,
            wait_ms,
            ack,
        } => {
            let body = c
                .send(
                    c.http()
                        .post(c.url(&format!("/v1/subscriptions/{name}/pull")))
                        .json(&json!({"max_messages": max, "wait_ms": wait_ms})),
                )
                .await?;
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            for m in &messages {
                println!("{m}");
            }
            if ack && !messages.is_empty() {
                let ids: Vec<&Value> = messages.iter().map(|m| &m["ack_id"]).collect();
                c.send(
                    c.http()
                        .post(c.url(&format!("/v1/subscriptions/{name}/ack")))
                        .json(&json!({ "ack_ids": ids })),
                )
                .await?;
                eprintln!("acked {} messages", messages.len());
            }
        }
        SubCommand::Redrive {
            name,
            filter,
            limit,
        } => {
            let mut body = json!({ "limit": limit });
            if let Some(f) = filter {
                body["filter"] = json!(f);
            }
            let r = c
                .send(
                    c.http()
                        .post(c.url(&format!("/v1/subscriptions/{name}/redrive")))
                        .json(&body),
                )
                .await?;
            println!("redrove {} dead letters to {name}", r["redriven"]);
        }
    }
    Ok(())
}
