//! Webhook delivery for subscriptions with `push`: each message is POSTed to the URL in
//! CloudEvents HTTP binary mode (attributes in `ce-` headers, data as the body); a 2xx answer acks
//! it, anything else or a timeout nacks it (the backoff schedule applies). At most
//! `max_in_flight` requests per subscription are outstanding.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use spate_broker::Event;
use spate_broker::subscriptions::{Delivery, PushConfig, Subscriptions, signing_key};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How often the set of pushing subscriptions is looked at.
const SCAN_EVERY: Duration = Duration::from_millis(500);

/// Runs webhook delivery for every subscription with `push` until `shutdown` resolves.
pub async fn run(subs: Arc<Subscriptions>, shutdown: impl std::future::Future<Output = ()>) {
    let client = match reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; webhooks are off");
            return;
        }
    };
    let mut running: HashMap<(String, u64, String), JoinHandle<()>> = HashMap::new();
    let mut every = tokio::time::interval(SCAN_EVERY);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = every.tick() => {
                running.retain(|_, h| !h.is_finished());
                for (name, uid, push) in subs.pushing() {
                    // The delivery task restarts when the definition changes (its
                    // `current` check ends the old one).
                    let key = (name.clone(), uid, serde_json::to_string(&push).unwrap_or_default());
                    if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(key) {
                        let task = deliver(subs.clone(), client.clone(), name, uid, push);
                        slot.insert(tokio::spawn(task));
                    }
                }
            }
        }
    }
    for (_, h) in running {
        h.abort();
    }
}

/// Whether subscription `name` still is `uid` with this push configuration.
fn current(subs: &Subscriptions, name: &str, uid: u64, push: &PushConfig) -> bool {
    // Checked before every pull: a lookup, not the subscription's stats.
    subs.push_config(name)
        .is_some_and(|(u, p)| u == uid && p.as_ref() == Some(push))
}

async fn deliver(
    subs: Arc<Subscriptions>,
    client: reqwest::Client,
    name: String,
    uid: u64,
    push: PushConfig,
) {
    let slots = Arc::new(Semaphore::new(push.max_in_flight as usize));
    while current(&subs, &name, uid, &push) {
        // Wait for a free slot, then take as many messages as there are free slots.
        let Ok(first) = slots.clone().acquire_owned().await else {
            return;
        };
        let room = slots.available_permits() + 1;
        let messages = match subs.pull(&name, room, Duration::from_secs(1)).await {
            Ok(m) => m,
            Err(_) => return,
        };
        let mut first = Some(first);
        for d in messages {
            let permit = match first.take() {
                Some(p) => p,
                None => match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (subs, client, name, push) =
                (subs.clone(), client.clone(), name.clone(), push.clone());
            tokio::spawn(async move {
                let ok = post(&client, &name, &push, &d).await;
                let ids = [d.ack_id.clone()];
                let settled = if ok {
                    subs.ack(&name, &ids).await
                } else {
                    subs.nack(&name, &ids, None).await
                };
                if let Err(e) = settled {
                    tracing::warn!(subscription = %name, error = %e, "cannot settle a webhook delivery");
                }
                drop(permit);
            });
        }
    }
}

/// Percent-encodes what a header value cannot carry (CloudEvents HTTP binding, 3.1.3.2).
fn header_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' && b != b'"' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The Standard Webhooks signature of a request: `v1,` and the base64 HMAC-SHA256, under the
/// secret's key, of `<webhook-id>.<webhook-timestamp>.<body>`.
fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

fn request(
    client: &reqwest::Client,
    subscription: &str,
    push: &PushConfig,
    d: &Delivery,
    e: &Event,
) -> reqwest::RequestBuilder {
    let body = e.data.clone().unwrap_or_default();
    let mut r = client
        .post(&push.url)
        .timeout(Duration::from_millis(push.timeout_ms));
    // The subscription's own headers first: those Spate sets below cannot be among them.
    for (name, v) in &push.headers {
        r = r.header(name, v);
    }
    if let Some(key) = push.secret.as_deref().and_then(|s| signing_key(s).ok()) {
        // The same id on every attempt of a message, so that a receiver can drop repeats.
        let id = format!("{subscription}:{}:{}:{}", d.topic, d.partition, d.offset);
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        r = r
            .header("webhook-signature", signature(&key, &id, timestamp, &body))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string());
    }
    let mut r = r
        .header("ce-specversion", "1.0")
        .header("ce-type", header_value(&e.event_type))
        .header("spate-delivery-attempt", d.attempt.to_string());
    let attrs = [
        ("ce-id", &e.id),
        ("ce-source", &e.source),
        ("ce-subject", &e.subject),
        ("ce-time", &e.time),
        ("ce-dataschema", &e.dataschema),
        ("content-type", &e.datacontenttype),
    ];
    for (name, v) in attrs {
        if let Some(v) = v {
            r = r.header(name, header_value(v));
        }
    }
    for (name, v) in &e.extensions {
        r = r.header(format!("ce-{name}"), header_value(v));
    }
    r.body(body)
}

/// POSTs one message; `true` on a 2xx answer.
async fn post(
    client: &reqwest::Client,
    subscription: &str,
    push: &PushConfig,
    d: &Delivery,
) -> bool {
    // Pulls of a pushing subscription hand out decoded events; one held only as JSON is parsed.
    let e = match d.event.decoded() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(url = %push.url, error = %e, "cannot send an event in binary mode");
            return false;
        }
    };
    match request(client, subscription, push, d, &e).send().await {
        Ok(r) => r.status().is_success(),
        Err(e) => {
            tracing::debug!(url = %push.url, error = %e, "webhook delivery failed");
            false
        }
    }
}
